//! Feeding projections from the events topic (the bus).
//!
//! A consumer group (one per feed) reads the topic from the offsets stored in PostgreSQL
//! ([`crate::kafka::group`]); records are gathered into batches (grouped by account, each
//! account's in order, repeats of a republished record dropped) and applied with
//! [`super::apply`], which records the next offsets in the same transaction as the effect.
//! A record the log's key does not vouch for ([`Vouch`]) is never applied: it goes to the
//! dead letters with the reason, is counted, and consumption goes on.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use keyledger_events::signature::LogKeys;
use keyledger_events::{decode_event, DeadLetter, DecodedEvent, Unsigned};
use rdkafka::message::Message;
use sqlx::PgPool;
use tokio::sync::watch;

use super::{apply, Offsets, Projection};
use crate::kafka::group::{note_offset, Group};
use crate::kafka::halt::Halts;
use crate::kafka::publisher::Publisher;
use crate::kafka::{supervise, BusConfig, BusError};
use crate::store::{group_by_account, Store, StoredRecord};

/// How long a batch may gather records after its first.
const GATHER: Duration = Duration::from_millis(10);

/// What a consumer of the events topic checks every record against: the log's public key,
/// and where a record it refuses goes.
///
/// Every consumer of a process shares one `Vouch` (clones share its memory): the projector,
/// the index follower, the saga and the notifier all read each event, and an Ed25519
/// verification is the dearest part of reading one, so a (chain value, signature) pair
/// that verified once is not verified again in this process. The chain value itself is
/// recomputed from each record's payload every time, which binds the remembered pair to
/// the payload: a forger cannot reuse a real pair for another event.
#[derive(Clone)]
pub struct Vouch {
    pub keys: LogKeys,
    pub dead_letters: Publisher,
    pub topic: String,
    verified: Arc<Mutex<HashSet<[u8; 32]>>>,
}

/// Most verified pairs remembered (then forgotten all at once).
const VERIFIED_KEPT: usize = 200_000;

impl Vouch {
    pub fn new(bus: &BusConfig, keys: LogKeys) -> Result<Self, BusError> {
        Ok(Self {
            keys,
            dead_letters: Publisher::new(bus, 5)?,
            topic: bus.dead_letters_topic(),
            verified: Arc::default(),
        })
    }

    /// Whether `decoded` is vouched for by the log's keys, remembering verified pairs.
    fn vouched(&self, decoded: &DecodedEvent) -> Result<(), Unsigned> {
        let (chain, signature) = decoded.chain_holds()?;
        let mut pair = blake3::Hasher::new();
        pair.update(&chain).update(signature.as_bytes());
        let pair: [u8; 32] = pair.finalize().into();
        let known = || self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if known().contains(&pair) {
            return Ok(());
        }
        if !self.keys.verifies(&chain, signature) {
            return Err(Unsigned::Signature);
        }
        let mut known = known();
        if known.len() >= VERIFIED_KEPT {
            known.clear();
        }
        known.insert(pair);
        Ok(())
    }

    /// Whether `decoded` (read from `message`) is one keyledger wrote; a refused record is
    /// dead-lettered (retried until the broker has it) and counted.
    pub async fn check<M: Message>(
        &self,
        consumer: &str,
        decoded: &DecodedEvent,
        message: &M,
    ) -> bool {
        let Err(why) = self.vouched(decoded) else {
            return true;
        };
        self.refuse(consumer, &format!("forged: {why}"), message)
            .await;
        false
    }

    /// Sends `message` to the dead letters with `reason`.
    pub async fn refuse<M: Message>(&self, consumer: &str, reason: &str, message: &M) {
        tracing::error!(
            consumer,
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "a record on the events topic is refused"
        );
        crate::metrics::metrics().count(
            "keyledger_events_refused_total",
            &[("consumer", consumer)],
            1,
        );
        let raw = message.payload().unwrap_or_default();
        let letter = DeadLetter {
            reason: format!("{consumer} refused it: {reason}"),
            original: base64::engine::general_purpose::STANDARD
                .encode(&raw[..raw.len().min(64 * 1024)]),
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let bytes = serde_json::to_vec(&letter).unwrap_or_default();
        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = self
            .dead_letters
            .send(&self.topic, key.as_deref(), &bytes)
            .await
        {
            tracing::warn!(error = %e, "dead letter not published yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// What a consumer of the events topic needs besides its projections: the bus, the database
/// that keeps its offsets, where it reports a halt, and the key its records must be signed by.
#[derive(Clone)]
pub struct TopicFeed {
    pub bus: BusConfig,
    pub pool: PgPool,
    pub halts: Halts,
    pub vouch: Vouch,
}

/// Feeds `projections` (in one transaction per batch) from the events topic as consumer
/// group `group`, until stopped, through outages; an offset the log lost halts it.
pub async fn follow(
    group: String,
    projections: Vec<Arc<dyn Projection>>,
    feed: TopicFeed,
    store: Arc<Store>,
    stop: watch::Receiver<bool>,
) {
    let TopicFeed {
        bus,
        pool,
        halts,
        vouch,
    } = feed;
    let topic = bus.events_topic();
    let group = group.as_str();
    supervise(group, &halts, stop, |s| {
        let (projections, store, topic, halts, bus, pool, vouch) =
            (&projections, &store, &topic, &halts, &bus, &pool, &vouch);
        async move {
            consume_batches(
                bus,
                pool,
                group,
                halts,
                vouch,
                bus.projector_batch,
                s,
                |batch, next| async move {
                    let refs: Vec<&dyn Projection> = projections.iter().map(|p| &**p).collect();
                    let offsets = Offsets {
                        consumer: group,
                        topic,
                        next: &next,
                    };
                    apply(store, &refs, &batch, Some(offsets)).await?;
                    Ok(())
                },
            )
            .await
        }
    })
    .await;
}

/// Consumes the events topic in `group`, handing each batch to `apply`, which must make its
/// effect and store the offsets in one transaction. A batch gathers for at most [`GATHER`]
/// after its first record.
#[allow(clippy::too_many_arguments)]
pub async fn consume_batches<F, Fut>(
    bus: &BusConfig,
    pool: &PgPool,
    group: &str,
    halts: &Halts,
    vouch: &Vouch,
    batch: usize,
    mut stop: watch::Receiver<bool>,
    mut apply: F,
) -> Result<(), BusError>
where
    F: FnMut(Vec<(String, Vec<StoredRecord>)>, Vec<(i32, i64)>) -> Fut,
    Fut: std::future::Future<Output = Result<(), BusError>>,
{
    let topic = bus.events_topic();
    let member = Group::join(bus, pool, group, &topic, halts)?;
    loop {
        let first = tokio::select! {
            m = member.next(Duration::from_secs(3)) => match m? {
                Some(m) => m,
                None => continue,
            },
            _ = stop.changed() => return Ok(()),
        };
        // Gather what arrives within a short window, up to a batch: a steady trickle
        // must not hold the first record back until the batch is full.
        let mut messages = vec![first];
        let deadline = tokio::time::Instant::now() + GATHER;
        while messages.len() < batch.max(1) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match member.next(left).await? {
                Some(m) => messages.push(m),
                None => break,
            }
        }
        let mut records = Vec::with_capacity(messages.len());
        let mut next: Vec<(i32, i64)> = Vec::new();
        for m in &messages {
            note_offset(&mut next, m);
            match decode_event(m.payload().unwrap_or_default()) {
                Ok(d) => {
                    if vouch.check(group, &d, m).await {
                        records.push(StoredRecord {
                            chain: Some(d.chain),
                            signature: d.signature,
                            actor: d.actor,
                            ..StoredRecord::bare(&d.account_id, d.sequence, d.event)
                        });
                    }
                }
                Err(e) => vouch.refuse(group, &format!("unreadable: {e}"), m).await,
            }
        }
        let mut by_account = group_by_account(records);
        // A republished record may repeat one already in this batch: keep order, drop repeats.
        for (_, records) in &mut by_account {
            records.sort_by_key(|r| r.sequence);
            records.dedup_by_key(|r| r.sequence);
        }
        apply(by_account, next).await?;
        if let Some(ms) = messages.last().and_then(|m| m.timestamp().to_millis()) {
            let lag = (chrono::Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0;
            crate::metrics::metrics().set(
                "keyledger_consumer_lag_seconds",
                &[("consumer", group)],
                lag,
            );
        }
    }
}
