//! Turning an ExpiryReminderDue, a KeyExpired or a leaked key's KeyRevoked event into
//! emails, one per recipient.
//!
//! The wording lives in `templates/*.txt` (a `Subject:` line, a blank line, the body), built
//! in and replaceable from a folder at start-up (`KEYLEDGER_TEMPLATE_DIR`). Rendering is
//! pure: the same event always gives the same notifications with the same ids.

use std::path::Path;

use chrono::{DateTime, FixedOffset, Utc};
use keyledger_events::{KeyringEvent, Notification, NotificationStage, RevokeCause, StageWord};
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

    fn fill(&self, values: &[(&str, String)]) -> (String, String) {
        let values: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        (fill(&self.subject, &values), fill(&self.body, &values))
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

/// The four templates: a reminder, the last reminder, the expiry notice, the leak notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    reminder: Template,
    last_reminder: Template,
    expired: Template,
    leaked: Template,
}

const FILES: [&str; 4] = [
    "reminder.txt",
    "last-reminder.txt",
    "expired.txt",
    "leaked.txt",
];

impl Templates {
    /// The templates built into the binary (the repository's `templates/`).
    pub fn builtin() -> Self {
        let parse = |name, text| Template::parse(name, text).unwrap_or_else(|e| panic!("{e}"));
        Self {
            reminder: parse(FILES[0], include_str!("../../templates/reminder.txt")),
            last_reminder: parse(FILES[1], include_str!("../../templates/last-reminder.txt")),
            expired: parse(FILES[2], include_str!("../../templates/expired.txt")),
            leaked: parse(FILES[3], include_str!("../../templates/leaked.txt")),
        }
    }

    /// Templates from `dir`, which must hold the first three files; `leaked.txt`, added
    /// later, is the built-in one when the folder has none (a folder made for an older
    /// version still starts).
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Template::parse(name, &text)
        };
        let leaked = if dir.join(FILES[3]).exists() {
            read(FILES[3])?
        } else {
            Self::builtin().leaked
        };
        Ok(Self {
            reminder: read(FILES[0])?,
            last_reminder: read(FILES[1])?,
            expired: read(FILES[2])?,
            leaked,
        })
    }

    /// The notifications `event` (with id `event_id`) causes: one per recipient for an
    /// ExpiryReminderDue, a KeyExpired or the KeyRevoked of a leaked key, none for any other
    /// event. `last_stage` is the smallest configured stage, whose reminder says it is the
    /// last.
    pub fn render(
        &self,
        account_id: &str,
        event_id: Uuid,
        event: &KeyringEvent,
        last_stage: Option<u32>,
    ) -> Vec<Notification> {
        let Some(notice) = self.notice(event, last_stage) else {
            return vec![];
        };
        let (subject, body) = notice.template.fill(&notice.values);
        notice
            .recipients
            .iter()
            .map(|to| Notification {
                notification_id: Notification::id_for(event_id, to),
                event_id,
                account_id: account_id.to_owned(),
                key_id: notice.key_id,
                to: to.clone(),
                subject: subject.clone(),
                body: body.clone(),
                kind: notice.kind.to_owned(),
                stage: notice.stage,
            })
            .collect()
    }

    /// What `event` tells its recipients, if anything.
    fn notice<'a>(
        &'a self,
        event: &'a KeyringEvent,
        last_stage: Option<u32>,
    ) -> Option<Notice<'a>> {
        let common = |label: &'a str, last_five: &'a str, login: &'a str| {
            vec![
                ("label", label.to_owned()),
                ("last_five", last_five.to_owned()),
                ("login_email", login.to_owned()),
                ("rotation_guide", ROTATION_GUIDE.to_owned()),
            ]
        };
        Some(match event {
            KeyringEvent::ExpiryReminderDue(e) => {
                let mut values = common(&e.label, &e.last_five, &e.login_email);
                let urgency = if e.stage < 7 { "URGENT" } else { "Reminder" };
                let last_used = match (e.last_used_at, e.never_used) {
                    (Some(at), _) => format!(" It was last used on {}.", singapore_time(at)),
                    (None, true) => " It has never been used: if no system needs it, you \
                                     can let it expire without a replacement."
                        .to_owned(),
                    (None, false) => String::new(),
                };
                values.extend([
                    ("urgency", urgency.to_owned()),
                    ("when", in_words(e.stage)),
                    ("expires_at_sgt", singapore_time(e.expires_at)),
                    ("last_used", last_used),
                ]);
                Notice {
                    template: if Some(e.stage) == last_stage {
                        &self.last_reminder
                    } else {
                        &self.reminder
                    },
                    kind: "expiry_reminder",
                    stage: Some(NotificationStage::Days(e.stage)),
                    key_id: e.key_id,
                    recipients: &e.recipients,
                    values,
                }
            }
            KeyringEvent::KeyExpired(e) => {
                let mut values = common(&e.label, &e.last_five, &e.login_email);
                values.push(("expires_at_sgt", singapore_time(e.expires_at)));
                Notice {
                    template: &self.expired,
                    kind: "key_expired",
                    stage: None,
                    key_id: e.key_id,
                    recipients: &e.recipients,
                    values,
                }
            }
            KeyringEvent::KeyRevoked(e) if e.cause == Some(RevokeCause::Leaked) => {
                let mut values = common(&e.label, &e.last_five, &e.login_email);
                values.extend([
                    ("source", e.source.clone().unwrap_or_default()),
                    ("revoked_at_sgt", singapore_time(e.revoked_at)),
                ]);
                Notice {
                    template: &self.leaked,
                    kind: "key_leaked",
                    stage: Some(NotificationStage::Word(StageWord::Leaked)),
                    key_id: e.key_id,
                    recipients: &e.recipients,
                    values,
                }
            }
            _ => return None,
        })
    }
}

/// One kind of email about one key, before it is addressed.
struct Notice<'a> {
    template: &'a Template,
    kind: &'static str,
    stage: Option<NotificationStage>,
    key_id: Uuid,
    recipients: &'a [String],
    values: Vec<(&'static str, String)>,
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
            ..Default::default()
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
    fn a_reminder_says_when_the_key_was_last_used_or_that_it_never_was() {
        let t = Templates::builtin();
        let with = |last, never| {
            let KeyringEvent::ExpiryReminderDue(mut e) = reminder(14) else {
                unreachable!()
            };
            e.last_used_at = last;
            e.never_used = never;
            t.render(
                "acc",
                Uuid::nil(),
                &KeyringEvent::ExpiryReminderDue(e),
                Some(1),
            )[0]
            .body
            .clone()
        };
        assert!(with(Some(expiry()), false).contains("last used on 21 April 2024, 08:00"));
        assert!(with(None, true).contains("never been used"));
        let unknown = with(None, false);
        assert!(!unknown.contains("last used") && !unknown.contains("never"));
    }

    #[test]
    fn a_leak_notice_names_the_key_and_where_it_was_found() {
        use keyledger_events::{KeyRevoked, NotificationStage, StageWord};
        let e = KeyringEvent::KeyRevoked(KeyRevoked {
            key_id: Uuid::from_u128(1),
            revoked_at: expiry(),
            cause: Some(RevokeCause::Leaked),
            source: Some("https://github.com/agency/app/blob/main/.env".into()),
            recipients: vec!["a@agency.gov.sg".into(), "b@agency.gov.sg".into()],
            label: "prod".into(),
            last_five: "x1y2z".into(),
            login_email: "owner@agency.gov.sg".into(),
            ..Default::default()
        });
        let n = Templates::builtin().render("acc", Uuid::from_u128(5), &e, Some(1));
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].kind, "key_leaked");
        assert_eq!(n[0].stage, Some(NotificationStage::Word(StageWord::Leaked)));
        let json = serde_json::to_value(&n[0]).expect("json");
        assert_eq!(json["stage"], "leaked");
        for needle in [
            "\"prod\"",
            "x1y2z",
            "github.com/agency/app",
            "21 April 2024, 08:00",
        ] {
            assert!(
                n[0].body.contains(needle),
                "{needle} missing from {}",
                n[0].body
            );
        }
        // Any other revocation tells no one.
        let KeyringEvent::KeyRevoked(mut plain) = e else {
            unreachable!()
        };
        plain.cause = None;
        assert!(Templates::builtin()
            .render(
                "acc",
                Uuid::nil(),
                &KeyringEvent::KeyRevoked(plain),
                Some(1)
            )
            .is_empty());
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
