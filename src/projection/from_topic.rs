//! Feeding projections from the events topic (the bus).
//!
//! A consumer group (one per feed) reads the topic from the offsets stored in PostgreSQL
//! ([`crate::kafka::group`]); records are gathered into batches (grouped by account, each
//! account's in order, repeats of a republished record dropped) and applied with
//! [`super::apply`], which records the next offsets in the same transaction as the effect.

use std::sync::Arc;
use std::time::Duration;

use keyledger_events::decode_event;
use rdkafka::message::Message;
use sqlx::PgPool;
use tokio::sync::watch;

use super::{apply, Offsets, Projection};
use crate::kafka::group::{note_offset, Group};
use crate::kafka::halt::Halts;
use crate::kafka::{supervise, BusConfig, BusError};
use crate::store::{group_by_account, Store, StoredRecord};

/// How long a batch may gather records after its first.
const GATHER: Duration = Duration::from_millis(10);

/// Feeds `projections` (in one transaction per batch) from the events topic as consumer
/// group `group`, until stopped, through outages; an offset the log lost halts it.
pub async fn follow(
    group: String,
    projections: Vec<Arc<dyn Projection>>,
    bus: BusConfig,
    store: Arc<Store>,
    pool: PgPool,
    halts: Halts,
    stop: watch::Receiver<bool>,
) {
    let topic = bus.events_topic();
    let group = group.as_str();
    supervise(group, &halts, stop, |s| {
        let (projections, store, topic, halts, bus, pool) =
            (&projections, &store, &topic, &halts, &bus, &pool);
        async move {
            consume_batches(
                bus,
                pool,
                group,
                halts,
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
        let mut records = Vec::with_capacity(messages.len());
        let mut next: Vec<(i32, i64)> = Vec::new();
        for m in &messages {
            note_offset(&mut next, m);
            match decode_event(m.payload().unwrap_or_default()) {
                Ok(d) => records.push(StoredRecord {
                    account_id: d.account_id,
                    sequence: d.sequence,
                    event: d.event,
                    chain: Some(d.chain),
                }),
                Err(e) => {
                    tracing::error!(group, partition = m.partition(), offset = m.offset(), error = %e, "unreadable record on the events topic; skipped")
                }
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
