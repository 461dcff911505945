//! The notifier's outbox and its two ways out: the notifications topic and SMTP.
//!
//! Recording: each ExpiryReminderDue / KeyExpired becomes one outbox row per recipient, in
//! the same transaction as the notifier's checkpoints (and offsets); the row's id is derived
//! from the event id and the recipient, so an event consumed twice records one row.
//! Sending: a loop publishes each unpublished row once (idempotent producer, keyed by
//! account) and, with SMTP configured, sends each undelivered row, recording the delivery
//! at once; a failure is retried with exponential backoff. The one window left — the SMTP
//! server accepted a message and the process died before recording it — can repeat that
//! one email; its `Message-ID` is the notification id, so receivers can tell.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyledger_events::EventEnvelope;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::watch;

use super::outbox::{self, wall_ms, Marked, Pending};
use super::render::Templates;
use crate::kafka::publisher::Publisher;
use crate::projection::Projection;
use crate::store::{Store, StoreError, StoredRecord, Tx};

/// The notifier's consumer name (checkpoints, offsets, consumer group).
pub const NOTIFIER: &str = "keyledger-notifier";

/// How to reach the mail server.
#[derive(Clone, Debug)]
pub struct Smtp {
    pub transport: AsyncSmtpTransport<Tokio1Executor>,
    pub from: Mailbox,
    /// First retry delay; doubled per failed attempt up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    #[error("KEYLEDGER_SMTP_URL: {0}")]
    Url(String),
    #[error("KEYLEDGER_SMTP_FROM: {0}")]
    From(String),
}

impl Smtp {
    /// From a URL such as `smtp://host:25`, `smtp://user:pass@host:587?tls=required` or
    /// `smtps://host:465` (lettre's forms) and a sender such as `Postman <no-reply@x.gov.sg>`.
    /// Must be called inside the Tokio runtime (lettre's pool starts a task).
    pub fn new(
        url: &str,
        from: &str,
        retry_base: Duration,
        retry_max: Duration,
    ) -> Result<Self, SmtpConfigError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| SmtpConfigError::Url(e.to_string()))?
            .timeout(Some(Duration::from_secs(15)))
            .build();
        let from = from
            .parse()
            .map_err(|e: lettre::address::AddressError| SmtpConfigError::From(e.to_string()))?;
        Ok(Self {
            transport,
            from,
            retry_base,
            retry_max,
        })
    }

    fn backoff(&self, attempts: i64) -> Duration {
        let factor = 2u32.saturating_pow(attempts.clamp(0, 20) as u32);
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

pub struct Notifier {
    store: Arc<Store>,
    templates: Templates,
    last_stage: Option<u32>,
    /// Set when notifications go to the topic.
    producer: Option<(Publisher, String)>,
    smtp: Option<Smtp>,
    poll: Duration,
}

impl Notifier {
    pub fn new(
        store: Arc<Store>,
        templates: Templates,
        last_stage: Option<u32>,
        producer: Option<(Publisher, String)>,
        smtp: Option<Smtp>,
        poll: Duration,
    ) -> Self {
        Self {
            store,
            templates,
            last_stage,
            producer,
            smtp,
            poll,
        }
    }

    /// Publishes and delivers until stopped.
    pub async fn send_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let mut busy = false;
            match self.publish_pending().await {
                Ok(n) => busy |= n > 0,
                Err(e) => tracing::warn!(error = %e, "notifier cannot publish; retrying"),
            }
            match self.deliver_due().await {
                Ok(n) => busy |= n > 0,
                Err(e) => tracing::warn!(error = %e, "notifier cannot read its outbox; retrying"),
            }
            if !busy {
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = stop.changed() => break,
                }
            } else if *stop.borrow() {
                break;
            }
        }
        tracing::info!(part = "notifier", "stopped");
    }

    /// Publishes unpublished notifications to the topic; returns how many.
    pub async fn publish_pending(&self) -> Result<usize, StoreError> {
        let Some((producer, topic)) = &self.producer else {
            return Ok(0);
        };
        let pending = outbox::unpublished(&self.store, 500).await?;
        let mut done = 0;
        for Pending { notification, .. } in &pending {
            let json = serde_json::to_vec(notification).unwrap_or_default();
            match producer
                .send(topic, Some(notification.account_id.as_str()), &json)
                .await
            {
                Ok(_) => {
                    outbox::mark(&self.store, notification.notification_id, Marked::Published)
                        .await?;
                    done += 1;
                    notified("published");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish a notification; retrying");
                    break;
                }
            }
        }
        Ok(done)
    }

    /// Sends the notifications due for delivery by SMTP; returns how many were attempted.
    pub async fn deliver_due(&self) -> Result<usize, StoreError> {
        let Some(smtp) = &self.smtp else {
            return Ok(0);
        };
        let due = outbox::deliverable(&self.store, 50).await?;
        for Pending {
            notification: n,
            attempts,
        } in &due
        {
            let message =
                n.to.parse::<Mailbox>()
                    .map_err(|e| e.to_string())
                    .and_then(|to| {
                        Message::builder()
                            .from(smtp.from.clone())
                            .to(to)
                            .subject(n.subject.clone())
                            .message_id(Some(format!("<{}@keyledger>", n.notification_id)))
                            .header(ContentType::TEXT_PLAIN)
                            .body(n.body.clone())
                            .map_err(|e| e.to_string())
                    });
            let result = match message {
                Ok(m) => smtp
                    .transport
                    .send(m)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("cannot build the email: {e}")),
            };
            match result {
                Ok(()) => {
                    outbox::mark(&self.store, n.notification_id, Marked::Delivered).await?;
                    notified("delivered");
                    tracing::info!(notification_id = %n.notification_id, to = %n.to, kind = %n.kind, stage = ?n.stage, "notification delivered");
                }
                Err(e) => {
                    let delay = smtp.backoff(*attempts);
                    let retry_at = wall_ms() + delay.as_millis() as i64;
                    outbox::failed(&self.store, n.notification_id, retry_at, &e).await?;
                    notified("failed");
                    tracing::warn!(notification_id = %n.notification_id, attempts = attempts + 1, retry_in_ms = delay.as_millis() as u64, error = %e, "cannot deliver a notification; will retry");
                    // The server is likely down: do not hammer it with the rest of the batch.
                    break;
                }
            }
        }
        Ok(due.len())
    }
}

fn notified(what: &str) {
    crate::metrics::metrics().count("keyledger_notifications_total", &[("state", what)], 1);
}

#[async_trait]
impl Projection for Notifier {
    fn name(&self) -> &'static str {
        NOTIFIER
    }

    /// Each ExpiryReminderDue / KeyExpired becomes one outbox row per recipient.
    async fn apply(
        &self,
        tx: &mut Tx,
        batch: &[(&str, &[StoredRecord])],
    ) -> Result<(), StoreError> {
        let now_ms = wall_ms();
        let (published, deliver) = (self.producer.is_none(), self.smtp.is_some());
        for (account, records) in batch {
            for record in *records {
                let event_id = EventEnvelope::event_id_for(account, record.sequence);
                for n in self
                    .templates
                    .render(account, event_id, &record.event, self.last_stage)
                {
                    outbox::insert(tx, &n, now_ms, published, deliver).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Building the transport starts lettre's connection pool: it needs a runtime.
    #[tokio::test]
    async fn backoff_doubles_up_to_the_cap() {
        let smtp = Smtp::new(
            "smtp://127.0.0.1:2525",
            "keyledger <no-reply@localhost>",
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
        .expect("valid");
        assert_eq!(smtp.backoff(0), Duration::from_secs(1));
        assert_eq!(smtp.backoff(3), Duration::from_secs(8));
        assert_eq!(smtp.backoff(30), Duration::from_secs(60));
    }
}
