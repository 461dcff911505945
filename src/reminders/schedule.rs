//! A key's reminder schedule as a pure fold over its events.
//!
//! The saga keeps, per live key, the reminder stages still ahead (days before expiry) and
//! the expiry itself. Everything here is decided from the events alone, so the schedule
//! can be rebuilt from the log at any time and the table that persists it is only a cache
//! with an index on "what falls due next".

use chrono::{DateTime, Duration, Utc};
use keyledger_events::{Command, KeyringEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The reminder stages, in days before expiry, largest first (28, 14, 3, 1 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages(Vec<u32>);

impl Default for Stages {
    fn default() -> Self {
        Self(vec![28, 14, 3, 1])
    }
}

impl Stages {
    /// Parses a comma-separated list of days (each 1 to 366); empty means no reminders.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut days = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let d: u32 = part
                .parse()
                .map_err(|_| format!("'{part}' is not a number of days"))?;
            if !(1..=366).contains(&d) {
                return Err(format!("{d}: a reminder stage is 1 to 366 days"));
            }
            days.push(d);
        }
        days.sort_unstable_by(|a, b| b.cmp(a));
        days.dedup();
        Ok(Self(days))
    }

    pub fn days(&self) -> &[u32] {
        &self.0
    }

    /// The last reminder before expiry (the fewest days), which says so.
    pub fn last(&self) -> Option<u32> {
        self.0.last().copied()
    }
}

/// When stage `days` of a key expiring at `expires_at` falls due.
pub fn due_at(expires_at: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    expires_at - Duration::days(i64::from(days))
}

/// One key's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySchedule {
    pub account_id: String,
    pub key_id: Uuid,
    pub label: String,
    pub last_five: String,
    /// Who would be told now: the contacts, or the login email when there are none.
    pub recipients: Vec<String>,
    pub login_email: String,
    pub expires_at: DateTime<Utc>,
    /// Stages not yet decided (sent or skipped), largest first.
    pub pending: Vec<u32>,
}

/// What the saga should ask the keyring for, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Remind { stage: u32, skipping: Vec<u32> },
    Expire,
}

impl Action {
    /// The command, with an id derived from key and stage so that issuing it twice (two
    /// saga instances, a retry after a crash) is answered as a duplicate.
    pub fn command(&self, key_id: Uuid) -> (Uuid, Command) {
        match self {
            Action::Remind { stage, skipping } => (
                Uuid::new_v5(&key_id, format!("reminder/{stage}").as_bytes()),
                Command::SendExpiryReminder {
                    key_id,
                    stage: *stage,
                    skipping: skipping.clone(),
                    last_used_at: None,
                    usage_since: None,
                },
            ),
            Action::Expire => (
                Uuid::new_v5(&key_id, b"expire"),
                Command::ExpireKey { key_id },
            ),
        }
    }
}

/// What an event does to the schedule of the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key's schedule is now this.
    Put(KeySchedule),
    /// Nothing is left to do for the key (revoked or expired).
    Remove(Uuid),
    /// The event does not concern the schedule.
    None,
}

fn recipients(contacts: &[String], login_email: &str) -> Vec<String> {
    if contacts.is_empty() {
        vec![login_email.to_owned()]
    } else {
        contacts.to_vec()
    }
}

impl KeySchedule {
    /// The schedule of a key that starts counting at `from` (its creation or migration):
    /// only the stages still ahead at `from`.
    #[allow(clippy::too_many_arguments)]
    fn starting(
        account_id: &str,
        key_id: Uuid,
        label: &str,
        last_five: &str,
        recipients: Vec<String>,
        login_email: &str,
        expires_at: DateTime<Utc>,
        from: DateTime<Utc>,
        stages: &Stages,
    ) -> Self {
        Self {
            account_id: account_id.to_owned(),
            key_id,
            label: label.to_owned(),
            last_five: last_five.to_owned(),
            recipients,
            login_email: login_email.to_owned(),
            expires_at,
            pending: stages
                .days()
                .iter()
                .copied()
                .filter(|d| due_at(expires_at, *d) >= from)
                .collect(),
        }
    }

    /// When the next stage (or the expiry) falls due.
    pub fn next_due(&self) -> DateTime<Utc> {
        match self.pending.first() {
            Some(d) => due_at(self.expires_at, *d).min(self.expires_at),
            None => self.expires_at,
        }
    }

    /// The stages still ahead with when each falls due, then the expiry (stage 0).
    pub fn upcoming(&self) -> Vec<(u32, DateTime<Utc>)> {
        let mut v: Vec<_> = self
            .pending
            .iter()
            .map(|d| (*d, due_at(self.expires_at, *d)))
            .collect();
        v.push((0, self.expires_at));
        v
    }

    /// What is due at `now`: the expiry when it has passed; otherwise the latest overdue
    /// stage, with the earlier overdue ones to record as skipped (after downtime only the
    /// latest is sent).
    pub fn action(&self, now: DateTime<Utc>) -> Option<Action> {
        if self.expires_at <= now {
            return Some(Action::Expire);
        }
        let overdue: Vec<u32> = self
            .pending
            .iter()
            .copied()
            .filter(|d| due_at(self.expires_at, *d) <= now)
            .collect();
        let (&stage, earlier) = overdue.split_last()?;
        Some(Action::Remind {
            stage,
            skipping: earlier.to_vec(),
        })
    }
}

/// The key whose schedule `event` changes (for a rotation, the old key).
pub fn scheduled_key(event: &KeyringEvent) -> Uuid {
    match event {
        KeyringEvent::KeyGenerated(e) => e.key_id,
        KeyringEvent::ContactsUpdated(e) => e.key_id,
        KeyringEvent::KeyRevoked(e) => e.key_id,
        KeyringEvent::KeyRotated(e) => e.old_key_id,
        KeyringEvent::KeyExpired(e) => e.key_id,
        KeyringEvent::LegacyKeyMigrated(e) => e.key_id,
        KeyringEvent::ExpiryReminderDue(e) => e.key_id,
    }
}

/// The change `event` of `account_id` makes, given the key's current schedule.
pub fn change(
    account_id: &str,
    current: Option<&KeySchedule>,
    event: &KeyringEvent,
    stages: &Stages,
) -> Change {
    match event {
        KeyringEvent::KeyGenerated(e) => Change::Put(KeySchedule::starting(
            account_id,
            e.key_id,
            &e.label,
            &e.last_five,
            recipients(&e.contacts, &e.login_email),
            &e.login_email,
            e.expires_at,
            e.created_at,
            stages,
        )),
        KeyringEvent::LegacyKeyMigrated(e) => Change::Put(KeySchedule::starting(
            account_id,
            e.key_id,
            &e.label,
            &e.last_five,
            vec![e.login_email.clone()],
            &e.login_email,
            e.expires_at,
            e.migrated_at,
            stages,
        )),
        KeyringEvent::ContactsUpdated(e) => match current {
            Some(s) => Change::Put(KeySchedule {
                recipients: recipients(&e.contacts, &s.login_email),
                ..s.clone()
            }),
            None => Change::None,
        },
        KeyringEvent::KeyRotated(e) => match current {
            // The old key's life is cut to its grace: only the stages inside it remain.
            Some(s) => {
                let expires_at = s.expires_at.min(e.old_key_expires_at);
                Change::Put(KeySchedule {
                    pending: s
                        .pending
                        .iter()
                        .copied()
                        .filter(|d| due_at(expires_at, *d) >= e.rotated_at)
                        .collect(),
                    expires_at,
                    ..s.clone()
                })
            }
            None => Change::None,
        },
        KeyringEvent::ExpiryReminderDue(e) => match current {
            Some(s) => Change::Put(KeySchedule {
                pending: s
                    .pending
                    .iter()
                    .copied()
                    .filter(|d| *d != e.stage && !e.skipped_stages.contains(d))
                    .collect(),
                ..s.clone()
            }),
            None => Change::None,
        },
        KeyringEvent::KeyRevoked(e) => Change::Remove(e.key_id),
        KeyringEvent::KeyExpired(e) => Change::Remove(e.key_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use keyledger_events::{ExpiryReminderDue, KeyGenerated, KeyRotated};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 15, 2, 0, 0)
            .single()
            .expect("valid")
    }

    fn generated(created: DateTime<Utc>, expires: DateTime<Utc>) -> KeyringEvent {
        KeyringEvent::KeyGenerated(KeyGenerated {
            command_id: Uuid::nil(),
            key_id: Uuid::from_u128(7),
            label: "prod".into(),
            last_five: "abcde".into(),
            key_hash: String::new(),
            hash_scheme: String::new(),
            contacts: vec![],
            login_email: "owner@agency.gov.sg".into(),
            created_at: created,
            expires_at: expires,
            rotated_from: None,
        })
    }

    fn put(c: Change) -> KeySchedule {
        match c {
            Change::Put(s) => s,
            other => panic!("expected a schedule, got {other:?}"),
        }
    }

    #[test]
    fn a_new_key_gets_every_stage_and_the_login_email_without_contacts() {
        let s = put(change(
            "acc",
            None,
            &generated(t0(), t0() + Duration::days(181)),
            &Stages::default(),
        ));
        assert_eq!(s.pending, vec![28, 14, 3, 1]);
        assert_eq!(s.recipients, vec!["owner@agency.gov.sg".to_owned()]);
        assert_eq!(s.next_due(), t0() + Duration::days(181 - 28));
        assert_eq!(s.action(t0()), None);
    }

    #[test]
    fn a_key_created_close_to_its_expiry_gets_only_the_stages_ahead() {
        let s = put(change(
            "acc",
            None,
            &generated(t0(), t0() + Duration::days(10)),
            &Stages::default(),
        ));
        assert_eq!(s.pending, vec![3, 1]);
    }

    #[test]
    fn after_downtime_only_the_latest_overdue_stage_is_sent() {
        let expires = t0() + Duration::days(181);
        let s = put(change(
            "acc",
            None,
            &generated(t0(), expires),
            &Stages::default(),
        ));
        assert_eq!(
            s.action(expires - Duration::days(2)),
            Some(Action::Remind {
                stage: 3,
                skipping: vec![28, 14]
            })
        );
        assert_eq!(s.action(expires), Some(Action::Expire));
        let after = put(change(
            "acc",
            Some(&s),
            &KeyringEvent::ExpiryReminderDue(ExpiryReminderDue {
                command_id: Uuid::nil(),
                key_id: s.key_id,
                stage: 3,
                recipients: vec![],
                expires_at: expires,
                due_at: expires - Duration::days(3),
                skipped_stages: vec![28, 14],
                label: String::new(),
                last_five: String::new(),
                login_email: String::new(),
                ..Default::default()
            }),
            &Stages::default(),
        ));
        assert_eq!(after.pending, vec![1]);
    }

    #[test]
    fn rotation_keeps_only_the_stages_inside_the_grace() {
        let expires = t0() + Duration::days(181);
        let s = put(change(
            "acc",
            None,
            &generated(t0(), expires),
            &Stages::default(),
        ));
        let rotated_at = t0() + Duration::days(30);
        let after = put(change(
            "acc",
            Some(&s),
            &KeyringEvent::KeyRotated(KeyRotated {
                command_id: Uuid::nil(),
                old_key_id: s.key_id,
                new_key_id: Uuid::from_u128(8),
                old_key_expires_at: rotated_at + Duration::days(3),
                rotated_at,
                revoke_old_on_first_use: false,
            }),
            &Stages::default(),
        ));
        assert_eq!(after.pending, vec![3, 1]);
        assert_eq!(after.expires_at, rotated_at + Duration::days(3));
    }

    #[test]
    fn stages_parse_sorted_and_checked() {
        assert_eq!(
            Stages::parse("1, 28,3,14,3").map(|s| s.0),
            Ok(vec![28, 14, 3, 1])
        );
        assert!(Stages::parse("0").is_err());
        assert!(Stages::parse("x").is_err());
        assert_eq!(Stages::parse("").map(|s| s.0), Ok(vec![]));
    }
}
