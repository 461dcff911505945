//! The projector: the listing table and the persisted verification index, built from the
//! events topic.
//!
//! Each batch of records is applied, and the next offsets recorded, in one PostgreSQL
//! transaction; per-account checkpoints skip what was already applied (a republished
//! record, a replay after a crash), so a crash or a rebalance never applies an event twice
//! or skips one.

use std::time::Duration;

use keyledger_events::{decode_event, DecodeError};
use rdkafka::message::Message;
use sqlx::PgPool;
use tokio::sync::watch;

use super::group::{note_offset, Group};
use super::halt::Halts;
use super::{supervise, BusConfig, BusError};
use crate::store::{project_batch, Store, StoredRecord};

/// Parses one record of the events topic (see [`keyledger_events::decode_event`]).
pub fn parse_event(bytes: &[u8]) -> Result<StoredRecord, DecodeError> {
    let d = decode_event(bytes)?;
    Ok(StoredRecord {
        account_id: d.account_id,
        sequence: d.sequence,
        event: d.event,
        chain: Some(d.chain),
    })
}

/// How long a batch may gather records after its first.
const GATHER: Duration = Duration::from_millis(10);

pub struct Projector {
    bus: BusConfig,
    store: std::sync::Arc<Store>,
    pool: PgPool,
    halts: Halts,
}

impl Projector {
    pub fn new(bus: BusConfig, store: std::sync::Arc<Store>, pool: PgPool, halts: Halts) -> Self {
        Self {
            bus,
            store,
            pool,
            halts,
        }
    }

    pub async fn run(self, stop: watch::Receiver<bool>) {
        let group = self.bus.projector_group.clone();
        supervise(&group, &self.halts, stop, |s| self.consume(s)).await;
    }

    async fn consume(&self, stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let topic = self.bus.events_topic();
        let group = self.bus.projector_group.clone();
        consume_batches(
            &self.bus,
            &self.pool,
            &group,
            &self.halts,
            self.bus.projector_batch,
            stop,
            |by_account, next| {
                let (store, group, topic) = (&self.store, &group, &topic);
                async move {
                    project_batch(store, group, topic, &by_account, &next).await?;
                    Ok(())
                }
            },
        )
        .await
    }
}

/// One batch of the events topic: each account's new records in order, and the next offset
/// of each partition the batch read.
pub type Batch = (Vec<(String, Vec<StoredRecord>)>, Vec<(i32, i64)>);

/// Consumes the events topic in `group`, handing each batch to `apply`, which must make its
/// effect and store the offsets in one transaction. Records before the stored offsets are
/// skipped; a batch gathers for at most [`GATHER`] after its first record.
pub async fn consume_batches<F, Fut>(
    bus: &BusConfig,
    pool: &PgPool,
    group: &str,
    halts: &Halts,
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
        let mut by_account: Vec<(String, Vec<StoredRecord>)> = Vec::new();
        let mut next: Vec<(i32, i64)> = Vec::new();
        for m in &messages {
            note_offset(&mut next, m);
            match parse_event(m.payload().unwrap_or_default()) {
                Ok(record) => match by_account.iter_mut().find(|(a, _)| *a == record.account_id) {
                    Some((_, records)) => records.push(record),
                    None => by_account.push((record.account_id.clone(), vec![record])),
                },
                Err(e) => {
                    tracing::error!(group, partition = m.partition(), offset = m.offset(), error = %e, "unreadable record on the events topic; skipped")
                }
            }
        }
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
