//! The configurable rules: validity, the key cap, rotation grace, the legacy cut-off, the
//! reminder stages.

use chrono::{DateTime, Duration, Months, TimeZone, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Calendar months a key is valid for (6).
    pub validity_months: u32,
    /// Live (neither revoked nor expired) keys an account may hold (50).
    pub max_live_keys: usize,
    /// Grace of a rotated key when the command names none (24 h).
    pub default_grace: Duration,
    /// The longest grace a caller may ask for (30 days).
    pub max_grace: Duration,
    /// The fixed expiry of migrated legacy keys (2024-04-21T00:00:00Z).
    pub legacy_expiry: DateTime<Utc>,
    /// Days before expiry a reminder goes out (28, 14, 3, 1): the only stages the keyring
    /// records, whoever asks.
    pub reminder_stages: Vec<u32>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            validity_months: 6,
            max_live_keys: 50,
            default_grace: Duration::hours(24),
            max_grace: Duration::days(30),
            legacy_expiry: Utc
                .with_ymd_and_hms(2024, 4, 21, 0, 0, 0)
                .single()
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
            reminder_stages: vec![28, 14, 3, 1],
        }
    }
}

impl Policy {
    /// The expiry of a key created at `created_at`: that many calendar months later (the
    /// day clamped to the month's end, so 31 August + 6 months = 28/29 February).
    pub fn expiry_for(&self, created_at: DateTime<Utc>) -> DateTime<Utc> {
        created_at
            .checked_add_months(Months::new(self.validity_months))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_calendar_months_clamped_to_month_end() {
        let p = Policy::default();
        let t = |y, m, d| {
            Utc.with_ymd_and_hms(y, m, d, 8, 0, 0)
                .single()
                .expect("valid")
        };
        assert_eq!(p.expiry_for(t(2026, 1, 15)), t(2026, 7, 15));
        assert_eq!(p.expiry_for(t(2026, 8, 31)), t(2027, 2, 28));
    }
}
