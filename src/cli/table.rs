//! `keyledger keys list` for a person: the listing as a table read at a glance — label,
//! last five, status, "expires in 23 days", last used — with keys expiring within 28 days
//! in colour (yellow; red within 3 days). Pure: rows and the time in, text out.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// Keys expiring within this many days stand out.
const SOON_DAYS: i64 = 28;
const URGENT_DAYS: i64 = 3;

const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// "in 23 days", "in 5 hours", "3 days ago", "just now".
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (t - now).num_seconds();
    let (n, unit) = match seconds.abs() {
        s if s < 60 => return "just now".into(),
        s if s < 3_600 => (s / 60, "minute"),
        s if s < 86_400 => (s / 3_600, "hour"),
        s => (s / 86_400, "day"),
    };
    let plural = if n == 1 { "" } else { "s" };
    if seconds > 0 {
        format!("in {n} {unit}{plural}")
    } else {
        format!("{n} {unit}{plural} ago")
    }
}

fn time(row: &Value, field: &str) -> Option<DateTime<Utc>> {
    row[field].as_str().and_then(|s| s.parse().ok())
}

/// The listing's `rows` as a table, as of `now`; `colour` adds ANSI colours.
pub fn render(rows: &[Value], now: DateTime<Utc>, colour: bool) -> String {
    if rows.is_empty() {
        return "no keys\n".into();
    }
    let header = [
        "LABEL",
        "KEY",
        "STATUS",
        "EXPIRES",
        "LAST USED",
        "USES (30 D)",
    ];
    let mut lines: Vec<([String; 6], Option<&str>)> = Vec::with_capacity(rows.len());
    for row in rows {
        let status = row["status"].as_str().unwrap_or("?").to_owned();
        let expires = time(row, "expires_at");
        let days_left = expires.map(|e| (e - now).num_seconds() as f64 / 86_400.0);
        let expiry = match (status.as_str(), expires) {
            ("revoked", _) => time(row, "revoked_at")
                .map(|t| format!("revoked {}", relative(t, now)))
                .unwrap_or_else(|| "revoked".into()),
            (_, Some(e)) if e <= now => format!("expired {}", relative(e, now)),
            (_, Some(e)) => format!("expires {}", relative(e, now)),
            (_, None) => "?".into(),
        };
        let paint = match (status.as_str(), days_left) {
            ("active", Some(d)) if d <= URGENT_DAYS as f64 => Some(RED),
            ("active", Some(d)) if d <= SOON_DAYS as f64 => Some(YELLOW),
            _ => None,
        };
        let last_used = time(row, "last_used_at")
            .map(|t| relative(t, now))
            .unwrap_or_else(|| "never".into());
        lines.push((
            [
                row["label"].as_str().unwrap_or_default().to_owned(),
                format!("…{}", row["last_five"].as_str().unwrap_or_default()),
                status,
                expiry,
                last_used,
                row["verifications_30d"].as_i64().unwrap_or(0).to_string(),
            ],
            paint,
        ));
    }
    let mut widths = header.map(|h| h.chars().count());
    for (cells, _) in &lines {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String; 6]| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(&format!("{c:>w$}"));
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out
    };
    let mut out = line(&header.map(String::from));
    out.push('\n');
    for (cells, paint) in &lines {
        match paint.filter(|_| colour) {
            Some(p) => out.push_str(&format!("{p}{}{RESET}\n", line(cells))),
            None => out.push_str(&format!("{}\n", line(cells))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn a_table_a_person_reads_at_a_glance() {
        let n = now();
        let rows = vec![
            json!({"label": "prod", "last_five": "a1b2c", "status": "active",
                   "expires_at": n + Duration::days(23) + Duration::hours(1),
                   "last_used_at": n - Duration::hours(2), "verifications_30d": 1234}),
            json!({"label": "old", "last_five": "zz9zz", "status": "active",
                   "expires_at": n + Duration::days(120), "last_used_at": null,
                   "verifications_30d": 0}),
            json!({"label": "gone", "last_five": "qqqqq", "status": "revoked",
                   "expires_at": n + Duration::days(100), "revoked_at": n - Duration::days(3),
                   "last_used_at": null, "verifications_30d": 0}),
        ];
        let plain = render(&rows, n, false);
        let lines: Vec<&str> = plain.lines().collect();
        assert_eq!(lines.len(), 4, "{plain}");
        assert!(lines[0].starts_with("LABEL"));
        assert!(lines[1].contains("prod") && lines[1].contains("…a1b2c"));
        assert!(lines[1].contains("expires in 23 days") && lines[1].contains("2 hours ago"));
        assert!(lines[1].trim_end().ends_with("1234"));
        assert!(lines[2].contains("never") && lines[2].contains("expires in 120 days"));
        assert!(lines[3].contains("revoked 3 days ago"));
        assert!(!plain.contains('\x1b'), "no colour unless asked");

        let coloured = render(&rows, n, true);
        let lines: Vec<&str> = coloured.lines().collect();
        assert!(
            lines[1].starts_with(YELLOW),
            "expiring within 28 days stands out"
        );
        assert!(!lines[2].contains('\x1b') && !lines[3].contains('\x1b'));
        let urgent = vec![
            json!({"label": "x", "last_five": "11111", "status": "active",
                                 "expires_at": n + Duration::hours(30)}),
        ];
        assert!(render(&urgent, n, true)
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(RED)));
    }

    #[test]
    fn relative_times() {
        let n = now();
        assert_eq!(relative(n + Duration::seconds(10), n), "just now");
        assert_eq!(relative(n + Duration::minutes(5), n), "in 5 minutes");
        assert_eq!(relative(n - Duration::days(1), n), "1 day ago");
    }
}
