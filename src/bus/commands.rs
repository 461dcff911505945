//! The command consumer: `keyledger.commands` in, `keyledger.command-results` (or
//! `keyledger.dead-letters`) out.
//!
//! At-least-once, made exactly-once in effect by the command ids: a message is handled,
//! its result (or dead letter) is acknowledged by the broker, and only then is its offset
//! recorded in PostgreSQL (at most every 250 ms per partition). After a crash the message is handled again; the aggregate
//! recognises the command id and the second result says `duplicate`. Several instances share
//! the work as one consumer group ([`crate::kafka::group`]: each partition resumes at the offset
//! stored in PostgreSQL). A ReportLeak spans accounts: the [`crate::leaks`] desk takes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyledger_events::{
    Command, CommandEnvelope, CommandResult, CommandStatus, DeadLetter, ErrorBody,
};
use rdkafka::message::{Message, OwnedMessage};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::domain::api_key::redact_keys;
use crate::domain::seal;
use crate::domain::AccountId;
use crate::handler::{CommandHandler, HandleError, Request, Status};
use crate::kafka::group::Group;
use crate::kafka::halt::Halts;
use crate::kafka::publisher::Publisher;
use crate::kafka::{supervise, BusConfig, BusError};
use crate::keyring::KeyringError;
use crate::leaks::{LeakDesk, Report};
use crate::store::offsets;

/// How long the consumer waits for a record before it looks at its assignment again.
const IDLE: Duration = Duration::from_secs(3);

/// Records queued per partition worker.
const WORKER_QUEUE: usize = 256;
/// Most records a partition worker answers together.
const WORKER_BATCH: usize = 100;
/// How often a worker records the offset of what it answered: a crash repeats at most
/// this much work (the repeated commands answer `duplicate`), and a steady load costs one
/// offset commit per period instead of one per batch.
const RECORD_EVERY: Duration = Duration::from_millis(250);

/// How much of an oversized value a dead letter keeps.
const DEAD_LETTER_KEEP: usize = 64 * 1024;

pub struct CommandConsumer {
    bus: BusConfig,
    pool: PgPool,
    handler: Arc<CommandHandler>,
    leaks: Arc<LeakDesk>,
    producer: Publisher,
    halts: Halts,
}

/// What one message produced.
enum Reply {
    Result(CommandResult),
    DeadLetter(DeadLetter),
}

/// What the consumer makes of one record before the handler sees it.
pub enum Admission {
    /// Not a command at all (too large, not JSON, not an envelope): a dead letter, with
    /// the reason.
    Dead(String),
    /// An envelope refused as it stands (an invalid account id, a command only keyledger
    /// may issue, a missing or weak reply key), answered with this error code.
    Refused {
        envelope: Box<CommandEnvelope>,
        code: &'static str,
        message: String,
    },
    /// A command for the handler.
    Admitted {
        envelope: Box<CommandEnvelope>,
        request: Request,
    },
}

/// Reads a record of the commands topic: pure, so it is fuzzed (`fuzz/`) — no input may
/// make it panic.
pub fn admit(raw: &[u8], max_bytes: usize) -> Admission {
    if raw.len() > max_bytes {
        return Admission::Dead(format!(
            "oversized: {} bytes, the limit is {max_bytes} (original truncated to {DEAD_LETTER_KEEP} bytes)",
            raw.len(),
        ));
    }
    let envelope: Box<CommandEnvelope> = match serde_json::from_slice(raw) {
        Ok(e) => e,
        Err(e) => return Admission::Dead(format!("unparseable command envelope: {e}")),
    };
    let refuse = |envelope, code, message| Admission::Refused {
        envelope,
        code,
        message,
    };
    let account_id = match AccountId::parse(&envelope.account_id) {
        Ok(a) => a,
        Err(e) => {
            let e = KeyringError::from(e);
            let message = e.to_string();
            return refuse(envelope, e.code(), message);
        }
    };
    if envelope.command.is_internal() {
        let message = format!(
            "{} is issued by keyledger itself, never over the bus",
            envelope.command.command_type().as_str()
        );
        return refuse(envelope, "forbidden_command", message);
    }
    let needs_key = matches!(
        envelope.command,
        Command::GenerateKey { .. } | Command::RotateKey { .. }
    );
    let reply_key = if needs_key {
        match seal::parse_public_key(envelope.reply_public_key.as_deref())
            .map_err(|e| e.to_string())
        {
            Ok(k) => Some(k),
            Err(message) => return refuse(envelope, "invalid_reply_public_key", message),
        }
    } else {
        None
    };
    let request = Request {
        account_id,
        command_id: envelope.command_id,
        actor: format!("bus:{}", envelope.issued_by.as_deref().unwrap_or("unknown")),
        command: envelope.command.clone(),
        reply_key,
    };
    Admission::Admitted { envelope, request }
}

/// The answer to `envelope` with `status`, nothing else said yet.
fn answer(envelope: &CommandEnvelope, status: CommandStatus) -> CommandResult {
    CommandResult {
        command_id: envelope.command_id,
        account_id: envelope.account_id.clone(),
        status,
        error: None,
        key_id: None,
        sealed_api_key: None,
        event_sequences: vec![],
        results: None,
    }
}

/// A rejection of `envelope` with `code`.
fn rejected(envelope: &CommandEnvelope, code: &str, message: String) -> CommandResult {
    CommandResult {
        error: Some(ErrorBody {
            code: code.to_owned(),
            message,
        }),
        ..answer(envelope, CommandStatus::Rejected)
    }
}

/// A dead letter for `message` (its value cut to [`DEAD_LETTER_KEEP`] bytes). Key-shaped
/// strings in it (a leak report that could not be read) are reduced to their last five:
/// the dead letters are kept for 30 days.
fn dead_letter<M: Message>(message: &M, reason: String) -> DeadLetter {
    let raw = message.payload().unwrap_or_default();
    // Redacted whole, then cut: a cut through a key cannot leave most of it behind.
    let original = if memchr::memmem::find(raw, b"_v1_").is_some() {
        let text = redact_keys(&String::from_utf8_lossy(raw)).into_owned();
        STANDARD.encode(&text.as_bytes()[..text.len().min(DEAD_LETTER_KEEP)])
    } else {
        STANDARD.encode(&raw[..raw.len().min(DEAD_LETTER_KEEP)])
    };
    DeadLetter {
        reason: redact_keys(&reason).into_owned(),
        original,
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
    }
}

/// Whether the broker (or the producer before it) refuses a record for its size: publishing
/// it again would fail for ever.
fn too_large(e: &BusError) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    matches!(
        e,
        BusError::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        ))
    )
}

impl CommandConsumer {
    pub fn new(
        bus: BusConfig,
        pool: PgPool,
        handler: Arc<CommandHandler>,
        leaks: Arc<LeakDesk>,
        producer: Publisher,
        halts: Halts,
    ) -> Self {
        Self {
            bus,
            pool,
            handler,
            leaks,
            producer,
            halts,
        }
    }

    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let halts = self.halts.clone();
        supervise(&self.bus.commands_group, &halts, stop, |s| {
            let this = self.clone();
            async move { this.consume(s).await }
        })
        .await;
    }

    /// Reads the topic and hands each record to the worker of its partition: partitions
    /// are handled concurrently, each in order (an account's commands share a partition,
    /// so they stay in order).
    async fn consume(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let topic = self.bus.commands_topic();
        let group = Group::join(
            &self.bus,
            &self.pool,
            &self.bus.commands_group,
            &topic,
            &self.halts,
        )?;
        let mut workers: HashMap<i32, (mpsc::Sender<OwnedMessage>, JoinHandle<()>)> =
            HashMap::new();
        let result = loop {
            let message = tokio::select! {
                m = group.next(IDLE) => match m {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    Err(e) => break Err(e),
                },
                _ = stop.changed() => break Ok(()),
            };
            let partition = message.partition();
            let owned = message.detach();
            let queue = workers
                .entry(partition)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                    let worker = tokio::spawn(self.clone().work(rx));
                    (tx, worker)
                })
                .0
                .clone();
            if queue.send(owned).await.is_err() {
                break Err(BusError::Topic(
                    topic.clone(),
                    "a partition worker stopped".into(),
                ));
            }
        };
        // Drain: close the queues and let the workers finish what they hold.
        for (_, (queue, worker)) in workers {
            drop(queue);
            let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
        }
        result
    }

    /// One partition's worker. It takes what is queued (up to [`WORKER_BATCH`] records),
    /// handles them one by one in order, publishes their answers together, and records the
    /// offset once for the batch — only when every answer was acknowledged (retried until
    /// then), so a crash re-handles at most the batch and the command ids make that
    /// harmless.
    async fn work(self: Arc<Self>, mut queue: mpsc::Receiver<OwnedMessage>) {
        let topic = self.bus.commands_topic();
        // The next offset of what was answered but not yet recorded, and when it last was.
        let mut pending: Option<(i32, i64)> = None;
        let mut recorded_at = std::time::Instant::now();
        loop {
            let next = match pending {
                Some(_) => match tokio::time::timeout(RECORD_EVERY, queue.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        self.record(&topic, &mut pending, &mut recorded_at).await;
                        continue;
                    }
                },
                None => queue.recv().await,
            };
            let Some(first) = next else {
                // The queue closed (a rebalance, a stop): record what was answered.
                self.record(&topic, &mut pending, &mut recorded_at).await;
                return;
            };
            let mut batch = vec![first];
            while batch.len() < WORKER_BATCH {
                match queue.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            // Different accounts are handled concurrently, each account's commands in order.
            let mut by_account: Vec<(&[u8], Vec<usize>)> = Vec::new();
            for (i, m) in batch.iter().enumerate() {
                let key = m.key().unwrap_or_default();
                match by_account.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, idx)) => idx.push(i),
                    None => by_account.push((key, vec![i])),
                }
            }
            let handled = futures::future::join_all(by_account.into_iter().map(|(_, idx)| {
                let this = &self;
                let batch = &batch;
                async move {
                    let mut out = Vec::with_capacity(idx.len());
                    for i in idx {
                        out.push((i, this.handle(&batch[i]).await));
                    }
                    out
                }
            }))
            .await;
            let mut slots: Vec<Option<Reply>> = (0..batch.len()).map(|_| None).collect();
            for (i, reply) in handled.into_iter().flatten() {
                slots[i] = Some(reply);
            }
            let mut replies: Vec<Reply> = slots.into_iter().flatten().collect();
            let mut unpublished: Vec<usize> = (0..batch.len()).collect();
            let mut backoff = Duration::from_millis(100);
            loop {
                let sent = futures::future::join_all(
                    unpublished
                        .iter()
                        .map(|&i| self.publish(&replies[i], &batch[i])),
                )
                .await;
                unpublished = unpublished
                    .into_iter()
                    .zip(sent)
                    .filter_map(|(i, r)| r.err().map(|e| (i, e)))
                    .map(|(i, e)| {
                        if too_large(&e) && matches!(replies[i], Reply::Result(_)) {
                            // The answer can never be published: the command's own record
                            // goes to the dead letters instead (the effect, if any, stays).
                            let size = match &replies[i] {
                                Reply::Result(r) => serde_json::to_vec(r).map(|b| b.len()).unwrap_or(0),
                                Reply::DeadLetter(_) => 0,
                            };
                            replies[i] = Reply::DeadLetter(dead_letter(
                                &batch[i],
                                format!("result too large for the broker: {size} bytes ({e})"),
                            ));
                        } else {
                            tracing::warn!(error = %e, offset = batch[i].offset(), "answer not published yet; retrying");
                        }
                        i
                    })
                    .collect();
                if unpublished.is_empty() {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            let last = &batch[batch.len() - 1];
            pending = Some((last.partition(), last.offset() + 1));
            if recorded_at.elapsed() >= RECORD_EVERY {
                self.record(&topic, &mut pending, &mut recorded_at).await;
            }
        }
    }

    /// Records the offset of what was answered (kept pending on a database error: the
    /// next round tries again, and a crash meanwhile only repeats answered commands).
    async fn record(
        &self,
        topic: &str,
        pending: &mut Option<(i32, i64)>,
        recorded_at: &mut std::time::Instant,
    ) {
        let Some((partition, next)) = *pending else {
            return;
        };
        match offsets::save(&self.pool, &self.bus.commands_group, topic, partition, next).await {
            Ok(()) => {
                *pending = None;
                *recorded_at = std::time::Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "offset not recorded yet; retrying"),
        }
    }

    /// Handles one message; retries while the store is unavailable (the message stays
    /// unacknowledged), so a database outage loses nothing.
    async fn handle<M: Message>(&self, message: &M) -> Reply {
        let raw = message.payload().unwrap_or_default();
        let (envelope, request) = match admit(raw, self.bus.max_command_bytes) {
            Admission::Dead(reason) => return Reply::DeadLetter(dead_letter(message, reason)),
            Admission::Refused {
                envelope,
                code,
                message,
            } => return Reply::Result(rejected(&envelope, code, message)),
            Admission::Admitted { envelope, request } => (envelope, request),
        };
        let reject =
            |code: &str, message: String| Reply::Result(rejected(&envelope, code, message));
        if let Command::ReportLeak {
            keys,
            source,
            reporter,
        } = &request.command
        {
            let report = match Report::parse(keys.0.clone(), source, reporter) {
                Ok(r) => r,
                Err(e) => return reject("invalid_leak_report", e.to_string()),
            };
            return self.report_leak(&envelope, &request.actor, &report).await;
        }
        let mut backoff = Duration::from_millis(100);
        let outcome = loop {
            match self.handler.execute(request.clone()).await {
                Ok(o) => break o,
                Err(HandleError::Rejected(e)) => return reject(e.code(), e.to_string()),
                Err(e @ HandleError::IdempotencyKeyReused) => {
                    return reject("idempotency_key_reused", e.to_string())
                }
                Err(e) => {
                    tracing::warn!(error = %e, command_id = %envelope.command_id, "command not handled yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let status = match outcome.status {
            Status::Accepted => CommandStatus::Accepted,
            Status::Duplicate => CommandStatus::Duplicate,
        };
        Reply::Result(CommandResult {
            key_id: outcome.key.as_ref().map(|k| k.key_id),
            // The sealed box kept with the outcome: a redelivery gets the same key.
            sealed_api_key: outcome.sealed_api_key.clone(),
            event_sequences: outcome.sequences.clone(),
            ..answer(&envelope, status)
        })
    }

    /// A leak report: each key's command id derives from the envelope's, so a redelivery
    /// gets the original answers. Retried while the store is unavailable.
    async fn report_leak(&self, envelope: &CommandEnvelope, actor: &str, report: &Report) -> Reply {
        let mut backoff = Duration::from_millis(100);
        let results = loop {
            match self.leaks.report(envelope.command_id, actor, report).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, command_id = %envelope.command_id, "leak report not handled yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        Reply::Result(CommandResult {
            results: Some(results),
            ..answer(envelope, CommandStatus::Accepted)
        })
    }

    /// Publishes a result (keyed by command id) or a dead letter, and waits for the ack.
    async fn publish<M: Message>(&self, reply: &Reply, message: &M) -> Result<(), BusError> {
        let (topic, key, bytes) = match reply {
            Reply::Result(r) => {
                tracing::info!(command_id = %r.command_id, status = ?r.status, code = r.error.as_ref().map(|e| e.code.as_str()), "command handled");
                (
                    self.bus.results_topic(),
                    r.command_id.to_string(),
                    serde_json::to_vec(&r),
                )
            }
            Reply::DeadLetter(d) => {
                tracing::warn!(partition = d.partition, offset = d.offset, reason = %d.reason, "dead letter");
                let kind = d.reason.split(':').next().unwrap_or("other");
                crate::metrics::metrics().count(
                    "keyledger_dead_letters_total",
                    &[("reason", kind)],
                    1,
                );
                let key = message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                (self.bus.dead_letters_topic(), key, serde_json::to_vec(&d))
            }
        };
        let bytes = bytes.unwrap_or_default();
        self.producer.send(&topic, Some(&key), &bytes).await?;
        Ok(())
    }
}
