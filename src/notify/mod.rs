//! The notifier: every ExpiryReminderDue and KeyExpired becomes one email per recipient.
//!
//! - [`render`] turns an event into notifications from the templates.
//! - [`outbox`] is the table they wait in (`notifications`).
//! - [`dispatch`] records them there from the log (a projection; idempotent: the
//!   notification id is derived from the event id and the recipient), publishes each once on
//!   the notifications topic and, when SMTP is configured, sends each with retries and
//!   backoff, recording the delivery so a restart does not send it again.

pub mod dispatch;
pub mod outbox;
pub mod render;
