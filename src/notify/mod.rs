//! The notifier: every ExpiryReminderDue and KeyExpired becomes one email per recipient.
//!
//! - [`render`] turns an event into notifications from the templates.
//! - [`dispatch`] records them in an outbox (idempotent: the notification id is derived
//!   from the event id and the recipient), publishes each once on the notifications topic
//!   and, when SMTP is configured, sends each with retries and backoff, recording the
//!   delivery so a restart does not send it again.

pub mod dispatch;
pub mod render;
