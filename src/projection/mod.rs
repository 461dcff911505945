//! One way events reach a consumer of the log.
//!
//! A [`Projection`] (the idea of cqrs-es's `Query`) is a name and "apply these records
//! inside this transaction": the listing table, the persisted verification index, the
//! reminder saga's schedule and the notifier's outbox are each one. [`apply`] is the only
//! place that moves checkpoints: it locks each account's checkpoint, skips what was
//! applied before, fills a gap from the event store, hands the rest to the projections,
//! moves the checkpoints and (for a consumer of the events topic) records the next offsets
//! — all in one transaction, so a crash, a redelivery or a replay never applies an event
//! twice or skips one. Two sources feed it: the event store ([`from_store`]: a catch-up,
//! then the accounts this process commits to and, on PostgreSQL, those other instances
//! commit to) and the events topic ([`from_topic`]: a consumer group whose offsets live
//! next to the effect).

pub mod from_store;
pub mod from_topic;

use std::borrow::Cow;

use async_trait::async_trait;

use crate::store::{checkpoints, offsets, Store, StoreError, StoredRecord, Tx};

/// Something built from the log, idempotently per (account, sequence).
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Its name: its checkpoints (and, fed from the topic, its consumer group and offsets).
    fn name(&self) -> &'static str;

    /// Applies each account's records — in order, contiguous, never applied before —
    /// inside `tx`.
    async fn apply(&self, tx: &mut Tx, batch: &[(&str, &[StoredRecord])])
        -> Result<(), StoreError>;
}

/// Each account's records in order: what a source hands to [`apply`].
pub type Batch = [(String, Vec<StoredRecord>)];

/// Where a consumer of a topic has got to: the next offset of each partition it read.
#[derive(Debug, Clone, Copy)]
pub struct Offsets<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    /// (partition, next offset)
    pub next: &'a [(i32, i64)],
}

/// Applies `batch` to every projection of `projections` in one transaction, with their
/// checkpoints and, when `offsets` is given, the consumer's next offsets on a topic. Records at or below a checkpoint are
/// skipped; a gap before an account's first new record is filled from the event store.
pub async fn apply(
    store: &Store,
    projections: &[&dyn Projection],
    batch: &Batch,
    offsets: Option<Offsets<'_>>,
) -> Result<(), StoreError> {
    let mut batch = Cow::Borrowed(batch);
    // Each round fills at most one gap; a batch has at most one per account.
    for _ in 0..=batch.len() * projections.len().max(1) {
        match apply_once(store, projections, &batch, offsets).await? {
            None => return Ok(()),
            Some((i, checkpoint)) => {
                // Read outside the transaction: SQLite has a single connection.
                let (account, records) = &batch[i];
                let first = records
                    .iter()
                    .map(|r| r.sequence)
                    .find(|s| *s > checkpoint)
                    .unwrap_or(u64::MAX);
                let mut filled = store.events_after(account, checkpoint).await?;
                filled.retain(|r| r.sequence < first);
                filled.extend(records.iter().filter(|r| r.sequence >= first).cloned());
                batch.to_mut()[i].1 = filled;
            }
        }
    }
    Err(StoreError::Gap { checkpoint: 0 })
}

/// One attempt: `Some((account index, checkpoint))` when an account's records start past
/// a projection's checkpoint + 1 (nothing is written then).
async fn apply_once(
    store: &Store,
    projections: &[&dyn Projection],
    batch: &Batch,
    offsets: Option<Offsets<'_>>,
) -> Result<Option<(usize, u64)>, StoreError> {
    let accounts: Vec<&str> = batch.iter().map(|(a, _)| a.as_str()).collect();
    let mut tx = store.begin().await?;
    for projection in projections {
        let at = checkpoints::lock(&mut tx, projection.name(), &accounts).await?;
        let mut todo: Vec<(&str, &[StoredRecord])> = Vec::with_capacity(batch.len());
        let mut moved: Vec<(&str, u64)> = Vec::new();
        for (i, (account, records)) in batch.iter().enumerate() {
            let checkpoint = at.get(account.as_str()).copied().unwrap_or(0);
            let start = records.partition_point(|r| r.sequence <= checkpoint);
            let rest = &records[start..];
            let Some(first) = rest.first() else {
                continue;
            };
            if first.sequence != checkpoint + 1 {
                return Ok(Some((i, checkpoint)));
            }
            if rest.windows(2).any(|w| w[1].sequence != w[0].sequence + 1) {
                // A hole inside the records handed in: the source is wrong, not behind.
                return Err(StoreError::Gap { checkpoint });
            }
            todo.push((account.as_str(), rest));
            moved.push((account.as_str(), rest[rest.len() - 1].sequence));
        }
        if !todo.is_empty() {
            projection.apply(&mut tx, &todo).await?;
            checkpoints::set(&mut tx, projection.name(), &moved).await?;
        }
    }
    if let Some(o) = offsets {
        let c = tx.pg().ok_or(StoreError::PostgresOnly("the bus"))?;
        for (partition, next) in o.next {
            offsets::save(&mut *c, o.consumer, o.topic, *partition, *next).await?;
        }
    }
    tx.commit().await?;
    Ok(None)
}
