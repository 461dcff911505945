//! The command consumer: `keyledger.commands` in, `keyledger.command-results` (or
//! `keyledger.dead-letters`) out.
//!
//! At-least-once, made exactly-once in effect by the command ids: a message is handled,
//! its result (or dead letter) is acknowledged by the broker, and only then is its offset
//! recorded in PostgreSQL. After a crash the message is handled again; the aggregate
//! recognises the command id and the second result says `duplicate`. Offsets are read from
//! PostgreSQL after every rebalance: a message below the stored offset is skipped (and the
//! partition sought forward). Several instances share the work as one consumer group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyledger_events::{
    Command, CommandEnvelope, CommandResult, CommandStatus, DeadLetter, ErrorBody,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::orphans::blocking;
use super::publisher::Publisher;
use super::{seal, supervise, BusConfig, BusError};
use crate::domain::AccountId;
use crate::handler::{CommandHandler, HandleError, Request, Status};
use crate::keyring::KeyringError;
use crate::store::offsets;

/// How long without any record before partitions are checked for a stuck record.
const IDLE: Duration = Duration::from_secs(3);
/// How long one offset must stay stuck (through idle rounds) before its record is declared
/// unfetchable.
const UNFETCHABLE_AFTER: Duration = Duration::from_secs(12);

/// Records queued per partition worker.
const WORKER_QUEUE: usize = 256;
/// Most records a partition worker answers and commits together.
const WORKER_BATCH: usize = 100;

/// How much of an oversized value a dead letter keeps.
const DEAD_LETTER_KEEP: usize = 64 * 1024;

/// Marks that partitions moved, so stored offsets are read again; and whether this member
/// has been through a rebalance at all (until then, holding nothing means nothing).
#[derive(Default)]
pub struct RebalanceFlag {
    pub moved: AtomicBool,
    pub joined: AtomicBool,
}

impl ClientContext for RebalanceFlag {}

impl ConsumerContext for RebalanceFlag {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "partitions assigned");
            self.joined.store(true, Ordering::SeqCst);
        }
        self.moved.store(true, Ordering::SeqCst);
    }
}

/// A consumer in a group that keeps its offsets in PostgreSQL.
pub fn group_consumer(
    bus: &BusConfig,
    group: &str,
    topic: &str,
) -> Result<StreamConsumer<RebalanceFlag>, BusError> {
    let mut c = bus.client_config();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "100")
        // Records up to 64 MiB are fetched (a broker that does not return a record larger
        // than the fetch size would otherwise stall the partition on it); what exceeds the
        // command limit becomes a dead letter.
        .set("max.partition.fetch.bytes", "67108864")
        .set("fetch.max.bytes", "134217728")
        .set("receive.message.max.bytes", "268435456");
    for (k, v) in &bus.overrides {
        c.set(k, v);
    }
    let consumer: StreamConsumer<RebalanceFlag> = c.create_with_context(RebalanceFlag::default())?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// Positions read from PostgreSQL, invalidated on rebalance.
pub struct Positions {
    consumer: String,
    topic: String,
    next: HashMap<i32, i64>,
}

impl Positions {
    pub fn new(consumer: &str, topic: &str) -> Self {
        Self {
            consumer: consumer.to_owned(),
            topic: topic.to_owned(),
            next: HashMap::new(),
        }
    }

    /// Whether the message at `offset` of `partition` is already done; seeks forward when
    /// the consumer is behind the stored offset.
    pub async fn already_done(
        &mut self,
        pool: &PgPool,
        consumer: &StreamConsumer<RebalanceFlag>,
        partition: i32,
        offset: i64,
    ) -> Result<bool, BusError> {
        if consumer.context().moved.swap(false, Ordering::SeqCst) {
            self.next.clear();
        }
        let next = match self.next.get(&partition) {
            Some(n) => *n,
            None => {
                let n = offsets::load(pool, &self.consumer, &self.topic, partition).await?;
                self.next.insert(partition, n);
                if offset < n {
                    if let Err(e) = consumer.seek(
                        &self.topic,
                        partition,
                        Offset::Offset(n),
                        Duration::from_secs(5),
                    ) {
                        tracing::debug!(error = %e, partition, "seek failed; skipping instead");
                    }
                }
                n
            }
        };
        Ok(offset < next)
    }

    pub fn advance(&mut self, partition: i32, next: i64) {
        self.next.insert(partition, next);
    }
}

pub struct CommandConsumer {
    bus: BusConfig,
    pool: PgPool,
    handler: Arc<CommandHandler>,
    producer: Publisher,
}

/// What one message produced.
enum Reply {
    Result(CommandResult),
    DeadLetter(DeadLetter),
}

impl CommandConsumer {
    pub fn new(
        bus: BusConfig,
        pool: PgPool,
        handler: Arc<CommandHandler>,
        producer: Publisher,
    ) -> Self {
        Self {
            bus,
            pool,
            handler,
            producer,
        }
    }

    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        supervise("command consumer", stop, |s| {
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
        let consumer = group_consumer(&self.bus, &self.bus.commands_group, &topic)?;
        let mut positions = Positions::new(&self.bus.commands_group, &topic);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut workers: HashMap<i32, (mpsc::Sender<OwnedMessage>, JoinHandle<()>)> =
            HashMap::new();
        let mut orphans = super::orphans::OrphanWatch::default();
        let mut stuck: HashMap<i32, (i64, std::time::Instant)> = HashMap::new();
        let result = loop {
            if let Err(e) = orphans
                .check(&self.pool, &consumer, &self.bus.commands_group, &topic)
                .await
            {
                break Err(e);
            }
            let message = tokio::select! {
                m = tokio::time::timeout(IDLE, consumer.recv()) => match m {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => break Err(BusError::Kafka(e)),
                    Err(_) => {
                        if in_flight.load(Ordering::SeqCst) == 0 {
                            if let Err(e) = self.unstick(&consumer, &mut positions, &topic, &mut stuck).await {
                                break Err(e);
                            }
                        }
                        continue;
                    }
                },
                _ = stop.changed() => break Ok(()),
            };
            let (partition, offset) = (message.partition(), message.offset());
            match positions
                .already_done(&self.pool, &consumer, partition, offset)
                .await
            {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break Err(e),
            }
            let owned = message.detach();
            let queue = workers
                .entry(partition)
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                    let worker = tokio::spawn(self.clone().work(rx, in_flight.clone()));
                    (tx, worker)
                })
                .0
                .clone();
            in_flight.fetch_add(1, Ordering::SeqCst);
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
    async fn work(
        self: Arc<Self>,
        mut queue: mpsc::Receiver<OwnedMessage>,
        in_flight: Arc<AtomicUsize>,
    ) {
        let topic = self.bus.commands_topic();
        while let Some(first) = queue.recv().await {
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
            let replies: Vec<Reply> = slots.into_iter().flatten().collect();
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
                        tracing::warn!(error = %e, offset = batch[i].offset(), "answer not published yet; retrying");
                        i
                    })
                    .collect();
                if unpublished.is_empty() {
                    let last = &batch[batch.len() - 1];
                    match offsets::save(
                        &self.pool,
                        &self.bus.commands_group,
                        &topic,
                        last.partition(),
                        last.offset() + 1,
                    )
                    .await
                    {
                        Ok(()) => break,
                        Err(e) => tracing::warn!(error = %e, "offset not recorded yet; retrying"),
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            in_flight.fetch_sub(batch.len(), Ordering::SeqCst);
        }
    }

    /// Called when nothing arrived for [`IDLE`]: a partition whose next offset has stayed
    /// below its high watermark through idle rounds for [`UNFETCHABLE_AFTER`] holds a record
    /// the broker will not hand out. tansu 0.6.0 caps a fetch at 5 MiB and never returns a
    /// larger record (Kafka returns it anyway, KIP-74), which would stall the partition for
    /// ever. Such a record gets a dead letter (without its bytes, which cannot be read) and
    /// consumption moves past it. A slow first fetch (a loaded broker, a fresh assignment)
    /// is not mistaken for one: the same offset must stay stuck for the whole period, with
    /// the consumer's own position (when it has one) at that offset.
    async fn unstick(
        &self,
        consumer: &StreamConsumer<RebalanceFlag>,
        positions: &mut Positions,
        topic: &str,
        stuck: &mut HashMap<i32, (i64, std::time::Instant)>,
    ) -> Result<(), BusError> {
        let position = consumer.position().ok();
        let partitions: Vec<i32> = consumer
            .assignment()?
            .elements_for_topic(topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        for partition in partitions {
            let next =
                offsets::load(&self.pool, &self.bus.commands_group, topic, partition).await?;
            let (_, high) = match blocking(|| {
                consumer.fetch_watermarks(topic, partition, Duration::from_secs(5))
            }) {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, partition, "no watermarks");
                    continue;
                }
            };
            if next >= high {
                stuck.remove(&partition);
                continue;
            }
            let at = position
                .as_ref()
                .and_then(|tpl| tpl.find_partition(topic, partition))
                .map(|e| e.offset());
            if matches!(at, Some(Offset::Offset(o)) if o != next) {
                // The consumer is elsewhere (still skipping what is done): not stuck here.
                stuck.remove(&partition);
                continue;
            }
            match stuck.get(&partition) {
                Some((offset, since)) if *offset == next => {
                    if since.elapsed() < UNFETCHABLE_AFTER {
                        continue;
                    }
                }
                _ => {
                    stuck.insert(partition, (next, std::time::Instant::now()));
                    continue;
                }
            }
            stuck.remove(&partition);
            tracing::warn!(
                partition,
                offset = next,
                high,
                "a record cannot be fetched; dead-lettering it"
            );
            let dead = DeadLetter {
                reason: format!(
                    "unfetchable: the record at offset {next} was not delivered by the broker (larger than its fetch limit)"
                ),
                original: String::new(),
                topic: topic.to_owned(),
                partition,
                offset: next,
            };
            let bytes = serde_json::to_vec(&dead).unwrap_or_default();
            let dlq = self.bus.dead_letters_topic();
            crate::metrics::metrics().count(
                "keyledger_dead_letters_total",
                &[("reason", "unfetchable")],
                1,
            );
            self.producer.send(&dlq, None, &bytes).await?;
            offsets::save(
                &self.pool,
                &self.bus.commands_group,
                topic,
                partition,
                next + 1,
            )
            .await?;
            positions.advance(partition, next + 1);
            if let Err(e) = consumer.seek(
                topic,
                partition,
                Offset::Offset(next + 1),
                Duration::from_secs(5),
            ) {
                tracing::warn!(error = %e, partition, "seek past the unfetchable record failed");
            }
        }
        Ok(())
    }

    /// Handles one message; retries while the store is unavailable (the message stays
    /// unacknowledged), so a database outage loses nothing.
    async fn handle<M: Message>(&self, message: &M) -> Reply {
        let raw = message.payload().unwrap_or_default();
        let dead = |reason: String| {
            Reply::DeadLetter(DeadLetter {
                reason,
                original: STANDARD.encode(&raw[..raw.len().min(DEAD_LETTER_KEEP)]),
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            })
        };
        if raw.len() > self.bus.max_command_bytes {
            return dead(format!(
                "oversized: {} bytes, the limit is {} (original truncated to {} bytes)",
                raw.len(),
                self.bus.max_command_bytes,
                DEAD_LETTER_KEEP
            ));
        }
        let envelope: CommandEnvelope = match serde_json::from_slice(raw) {
            Ok(e) => e,
            Err(e) => return dead(format!("unparseable command envelope: {e}")),
        };
        let reject = |code: &str, message: String| {
            Reply::Result(CommandResult {
                command_id: envelope.command_id,
                account_id: envelope.account_id.clone(),
                status: CommandStatus::Rejected,
                error: Some(ErrorBody {
                    code: code.to_owned(),
                    message,
                }),
                key_id: None,
                sealed_api_key: None,
                event_sequences: vec![],
            })
        };
        let account_id = match AccountId::parse(&envelope.account_id) {
            Ok(a) => a,
            Err(e) => {
                let e = KeyringError::from(e);
                return reject(e.code(), e.to_string());
            }
        };
        let needs_key = matches!(
            envelope.command,
            Command::GenerateKey { .. } | Command::RotateKey { .. }
        );
        let reply_key = if needs_key {
            match seal::parse_public_key(envelope.reply_public_key.as_deref()) {
                Ok(k) => Some(k),
                Err(e) => return reject("invalid_reply_public_key", e.to_string()),
            }
        } else {
            None
        };
        let request = Request {
            account_id,
            command_id: envelope.command_id,
            issued_by: envelope.issued_by.clone().unwrap_or_else(|| "bus".into()),
            command: envelope.command.clone(),
        };
        let mut backoff = Duration::from_millis(100);
        let outcome = loop {
            match self.handler.execute(request.clone()).await {
                Ok(o) => break o,
                Err(HandleError::Rejected(e)) => return reject(e.code(), e.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, command_id = %envelope.command_id, "command not handled yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let sealed_api_key = match (&outcome.api_key, &reply_key) {
            (Some(key), Some(pk)) => match seal::seal(pk, key.expose().as_bytes()) {
                Ok(s) => Some(s),
                Err(e) => return reject("internal", e.to_string()),
            },
            _ => None,
        };
        Reply::Result(CommandResult {
            command_id: envelope.command_id,
            account_id: envelope.account_id.clone(),
            status: match outcome.status {
                Status::Accepted => CommandStatus::Accepted,
                Status::Duplicate => CommandStatus::Duplicate,
            },
            error: None,
            key_id: outcome.key.as_ref().map(|k| k.key_id),
            sealed_api_key,
            event_sequences: outcome.sequences.clone(),
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
