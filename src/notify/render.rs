//! Turning an ExpiryReminderDue or KeyExpired event into emails, one per recipient.
//!
//! The wording lives in `templates/*.txt` (a `Subject:` line, a blank line, the body), built
//! in and replaceable from a folder at start-up (`KEYLEDGER_TEMPLATE_DIR`). Rendering is
//! pure: the same event always gives the same notifications with the same ids.

use std::path::Path;

use chrono::{DateTime, FixedOffset, Utc};
use keyledger_events::{KeyringEvent, Notification};
use uuid::Uuid;

/// Where the last reminder and the expiry notice point to.
pub const ROTATION_GUIDE: &str =
    "https://guide.postman.gov.sg/api-guide/programmatic-email-api/generate-your-email-api-key";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    subject: String,
    body: String,
}

impl Template {
    fn parse(name: &str, text: &str) -> Result<Self, String> {
        let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
        let subject = first
            .strip_prefix("Subject:")
            .ok_or_else(|| format!("template {name}: the first line must be 'Subject: …'"))?
            .trim()
            .to_owned();
        Ok(Self {
            subject,
            body: rest.trim_start_matches('\n').to_owned(),
        })
    }

    fn fill(&self, values: &[(&str, &str)]) -> (String, String) {
        (fill(&self.subject, values), fill(&self.body, values))
    }
}

/// Expands each `{{name}}` of `text` once, in one pass: a value is never scanned again, so
/// a label that reads `{{login_email}}` stays literal. Unknown names stay as written.
fn fill(text: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let value = after.find("}}").and_then(|close| {
            let name = &after[..close];
            values
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v, close))
        });
        match value {
            Some((v, close)) => {
                out.push_str(v);
                rest = &after[close + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The three templates: a reminder, the last reminder, the expiry notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    reminder: Template,
    last_reminder: Template,
    expired: Template,
}

const FILES: [&str; 3] = ["reminder.txt", "last-reminder.txt", "expired.txt"];

impl Templates {
    /// The templates built into the binary (the repository's `templates/`).
    pub fn builtin() -> Self {
        let parse = |name, text| Template::parse(name, text).unwrap_or_else(|e| panic!("{e}"));
        Self {
            reminder: parse(FILES[0], include_str!("../../templates/reminder.txt")),
            last_reminder: parse(FILES[1], include_str!("../../templates/last-reminder.txt")),
            expired: parse(FILES[2], include_str!("../../templates/expired.txt")),
        }
    }

    /// Templates from `dir`, which must hold all three files.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Template::parse(name, &text)
        };
        Ok(Self {
            reminder: read(FILES[0])?,
            last_reminder: read(FILES[1])?,
            expired: read(FILES[2])?,
        })
    }

    /// The notifications `event` (with id `event_id`) causes: one per recipient for an
    /// ExpiryReminderDue or a KeyExpired, none for any other event. `last_stage` is the
    /// smallest configured stage, whose reminder says it is the last.
    pub fn render(
        &self,
        account_id: &str,
        event_id: Uuid,
        event: &KeyringEvent,
        last_stage: Option<u32>,
    ) -> Vec<Notification> {
        let (template, kind, stage, key_id, recipients, label, last_five, login, expires_at) =
            match event {
                KeyringEvent::ExpiryReminderDue(e) => (
                    if Some(e.stage) == last_stage {
                        &self.last_reminder
                    } else {
                        &self.reminder
                    },
                    "expiry_reminder",
                    Some(e.stage),
                    e.key_id,
                    &e.recipients,
                    &e.label,
                    &e.last_five,
                    &e.login_email,
                    e.expires_at,
                ),
                KeyringEvent::KeyExpired(e) => (
                    &self.expired,
                    "key_expired",
                    None,
                    e.key_id,
                    &e.recipients,
                    &e.label,
                    &e.last_five,
                    &e.login_email,
                    e.expires_at,
                ),
                _ => return vec![],
            };
        let when = stage.map(in_words).unwrap_or_default();
        let urgency = match stage {
            Some(d) if d < 7 => "URGENT",
            _ => "Reminder",
        };
        let expires = singapore_time(expires_at);
        let (subject, body) = template.fill(&[
            ("urgency", urgency),
            ("when", &when),
            ("label", label),
            ("last_five", last_five),
            ("login_email", login),
            ("expires_at_sgt", &expires),
            ("rotation_guide", ROTATION_GUIDE),
        ]);
        recipients
            .iter()
            .map(|to| Notification {
                notification_id: Notification::id_for(event_id, to),
                event_id,
                account_id: account_id.to_owned(),
                key_id,
                to: to.clone(),
                subject: subject.clone(),
                body: body.clone(),
                kind: kind.to_owned(),
                stage,
            })
            .collect()
    }
}

/// "four weeks", "three days", "one day": how Postman's subjects say a stage.
pub fn in_words(days: u32) -> String {
    const WORDS: [&str; 11] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    let say = |n: u32, unit: &str| {
        let number = WORDS
            .get(n as usize)
            .map(|w| w.to_string())
            .unwrap_or_else(|| n.to_string());
        format!("{number} {unit}{}", if n == 1 { "" } else { "s" })
    };
    if days % 7 == 0 {
        say(days / 7, "week")
    } else {
        say(days, "day")
    }
}

/// A time as Singapore reads it: "21 April 2024, 08:00 (Singapore time, GMT+8)".
pub fn singapore_time(at: DateTime<Utc>) -> String {
    let sgt = FixedOffset::east_opt(8 * 3600)
        .unwrap_or_else(|| FixedOffset::east_opt(0).expect("zero offset"));
    at.with_timezone(&sgt)
        .format("%-d %B %Y, %H:%M (Singapore time, GMT+8)")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use keyledger_events::{ExpiryReminderDue, KeyExpired};

    fn expiry() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 4, 21, 0, 0, 0)
            .single()
            .expect("valid")
    }

    fn reminder(stage: u32) -> KeyringEvent {
        KeyringEvent::ExpiryReminderDue(ExpiryReminderDue {
            command_id: Uuid::nil(),
            key_id: Uuid::from_u128(1),
            stage,
            recipients: vec!["a@agency.gov.sg".into(), "b@agency.gov.sg".into()],
            expires_at: expiry(),
            due_at: expiry(),
            skipped_stages: vec![],
            label: "prod".into(),
            last_five: "x1y2z".into(),
            login_email: "owner@agency.gov.sg".into(),
        })
    }

    #[test]
    fn subjects_follow_postman() {
        let t = Templates::builtin();
        let subject = |stage| {
            t.render("acc", Uuid::nil(), &reminder(stage), Some(1))[0]
                .subject
                .clone()
        };
        assert_eq!(
            subject(28),
            "Reminder: Your Postman API key will expire in four weeks!"
        );
        assert_eq!(
            subject(14),
            "Reminder: Your Postman API key will expire in two weeks!"
        );
        assert_eq!(
            subject(3),
            "URGENT: Your Postman API key will expire in three days!"
        );
        assert_eq!(
            subject(1),
            "URGENT: Your Postman API key will expire in one day!"
        );
    }

    #[test]
    fn one_email_per_recipient_naming_the_key_in_singapore_time() {
        let t = Templates::builtin();
        let n = t.render("acc", Uuid::from_u128(9), &reminder(1), Some(1));
        assert_eq!(n.len(), 2);
        assert_ne!(n[0].notification_id, n[1].notification_id);
        assert_eq!(
            n[0].notification_id,
            Notification::id_for(Uuid::from_u128(9), "a@agency.gov.sg")
        );
        let body = &n[0].body;
        for needle in [
            "owner@agency.gov.sg",
            "\"prod\"",
            "x1y2z",
            "21 April 2024, 08:00",
            "last reminder",
            ROTATION_GUIDE,
        ] {
            assert!(body.contains(needle), "{needle} missing from {body}");
        }
        assert!(!t.render("acc", Uuid::nil(), &reminder(3), Some(1))[0]
            .body
            .contains("last reminder"));
    }

    #[test]
    fn an_expiry_notice() {
        let e = KeyringEvent::KeyExpired(KeyExpired {
            command_id: Uuid::nil(),
            key_id: Uuid::from_u128(1),
            expires_at: expiry(),
            expired_at: expiry(),
            recipients: vec!["owner@agency.gov.sg".into()],
            label: "default".into(),
            last_five: "*****".into(),
            login_email: "owner@agency.gov.sg".into(),
        });
        let n = Templates::builtin().render("acc", Uuid::nil(), &e, Some(1));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].subject, "Your Postman API key has expired");
        assert_eq!(n[0].kind, "key_expired");
        assert!(n[0].body.contains("expired on 21 April 2024, 08:00"));
    }

    #[test]
    fn placeholders_are_expanded_once() {
        let values = [
            ("label", "{{login_email}}"),
            ("login_email", "owner@agency.gov.sg"),
        ];
        assert_eq!(
            fill("key {{label}} of {{login_email}} {{unknown}} {{", &values),
            "key {{login_email}} of owner@agency.gov.sg {{unknown}} {{"
        );
    }

    #[test]
    fn stages_in_words() {
        assert_eq!(in_words(21), "three weeks");
        assert_eq!(in_words(2), "two days");
        assert_eq!(in_words(45), "45 days");
    }
}
