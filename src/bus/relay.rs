//! The outbox relay: every committed event, exactly once in effect, in per-account order,
//! on the events topic.
//!
//! A trigger on `events` copies each event into `outbox` in the writing transaction. The
//! relay reads only rows whose transaction is older than the oldest one still running
//! (`xact_id < pg_snapshot_xmin(pg_current_snapshot())`), so it never skips a row of a
//! transaction still in flight; it publishes them in position order (which, per account,
//! is sequence order: an account's next event is written only after its previous one
//! committed), keyed by account, with the idempotent producer; only when every record of
//! the batch is acknowledged does it record their chain values and delete them from the
//! outbox, in one transaction. A crash in between republishes some records: consumers
//! dedupe on (account, sequence), and the republished envelope is byte-identical (the event
//! id and chain value are derived, not random).
//!
//! One relay publishes at a time: each holds a PostgreSQL advisory lock while it runs.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keyledger_events::{EventEnvelope, KeyringEvent};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::domain::LogSigner;
use crate::kafka::publisher::Publisher;
use crate::kafka::{supervise, BusError};
use crate::store::metadata as meta;
use keyledger_events::chain;

/// The advisory lock that makes one relay the publisher.
const RELAY_LOCK: i64 = 0x6b6c_7265_6c61; // "klrela"
struct OutboxRow {
    position: i64,
    account_id: String,
    sequence: u64,
    event: KeyringEvent,
    /// What its commit recorded beside it.
    metadata: HashMap<String, String>,
}

pub struct Relay {
    pool: PgPool,
    producer: Publisher,
    topic: String,
    batch: i64,
    signer: LogSigner,
    /// Accounts whose next outbox row cannot be read: held back, the others go on.
    stuck: std::sync::Mutex<HashSet<String>>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer: Publisher,
        topic: String,
        batch: i64,
        signer: LogSigner,
    ) -> Self {
        Self {
            pool,
            producer,
            topic,
            batch: batch.max(1),
            signer,
            stuck: std::sync::Mutex::new(HashSet::new()),
        }
    }

    fn stuck(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.stuck.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `stop` turns true; finishes the batch in hand first.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        // The relay reads no topic: nothing of it can halt.
        supervise("relay", &crate::kafka::halt::Halts::default(), stop, |s| {
            self.lead(s)
        })
        .await;
    }

    /// Takes the lead (the advisory lock) and publishes until stopped.
    async fn lead(&self, mut stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let mut lock = self.pool.acquire().await?;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut *lock)
                .await?;
            if got {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
        tracing::info!("relay is publishing");
        let result = self.publish_while_leading(&mut lock, stop).await;
        if result.is_err() {
            // Close the session that holds the lock (returned to the pool it would keep the
            // lock, and the next attempt could wait behind itself on another connection).
            drop(lock.detach());
        }
        result
    }

    async fn publish_while_leading(
        &self,
        lock: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), BusError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("keyledger_outbox").await?;
        let mut heads: HashMap<String, (u64, [u8; 32])> = HashMap::new();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // Still the leader? (The lock lives as long as this connection.)
            sqlx::query("SELECT 1").execute(&mut **lock).await?;
            let published = self.publish_batch(&mut heads).await?;
            crate::metrics::metrics().count(
                "keyledger_events_published_total",
                &[],
                published as u64,
            );
            if published == 0 {
                tokio::select! {
                    _ = listener.recv() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Publishes one batch; returns how many records it published.
    async fn publish_batch(
        &self,
        heads: &mut HashMap<String, (u64, [u8; 32])>,
    ) -> Result<usize, BusError> {
        let stuck: Vec<String> = self.stuck().iter().cloned().collect();
        let rows = sqlx::query(
            "SELECT position, aggregate_id, sequence, payload::text AS payload, \
             COALESCE(metadata::text, '{}') AS metadata FROM outbox \
             WHERE xact_id < pg_snapshot_xmin(pg_current_snapshot()) \
             AND aggregate_id <> ALL($2::text[]) ORDER BY position LIMIT $1",
        )
        .bind(self.batch)
        .bind(&stuck)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for r in &rows {
            let account_id: String = r.get("aggregate_id");
            if self.stuck().contains(&account_id) {
                continue;
            }
            let sequence = r.get::<i64, _>("sequence").max(0) as u64;
            let payload: String = r.get("payload");
            match serde_json::from_str::<KeyringEvent>(&payload) {
                Ok(event) => batch.push(OutboxRow {
                    position: r.get("position"),
                    account_id,
                    sequence,
                    event,
                    metadata: serde_json::from_str(r.get("metadata")).unwrap_or_default(),
                }),
                Err(e) => {
                    // This account's later events must not overtake it: the account stops
                    // here; every other account goes on.
                    tracing::error!(account_id = %account_id, sequence, error = %e, "an outbox row cannot be read; this account's events are held back until it is repaired");
                    crate::metrics::metrics().count("keyledger_relay_stuck_accounts_total", &[], 1);
                    self.stuck().insert(account_id.clone());
                    batch.retain(|row: &OutboxRow| row.account_id != account_id);
                }
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        // Chain values, in order.
        let mut chains = Vec::with_capacity(batch.len());
        for row in &batch {
            let previous = self
                .previous_chain(heads, &row.account_id, row.sequence)
                .await?;
            let value = chain::next(&previous, &row.account_id, row.sequence, &row.event);
            heads.insert(row.account_id.clone(), (row.sequence, value));
            chains.push((previous, value));
        }
        // Publish everything, then wait for every acknowledgement.
        let mut deliveries = Vec::with_capacity(batch.len());
        for (row, (previous, value)) in batch.iter().zip(&chains) {
            let mut envelope =
                EventEnvelope::of(&row.account_id, row.sequence, &row.event, previous, value);
            // The signature written with the event; events older than signing get one now.
            envelope.signature = Some(
                chain::recorded_signature(&row.metadata, row.sequence)
                    .map(str::to_owned)
                    .unwrap_or_else(|| self.signer.sign(value)),
            );
            envelope.actor = row
                .metadata
                .get(meta::ACTOR)
                .or_else(|| row.metadata.get(meta::ISSUED_BY))
                .cloned();
            let bytes = serde_json::to_vec(&envelope).unwrap_or_default();
            let producer = self.producer.clone();
            let topic = self.topic.clone();
            let key = row.account_id.clone();
            deliveries.push(async move { producer.send(&topic, Some(&key), &bytes).await });
        }
        for result in futures::future::join_all(deliveries).await {
            if let Err(e) = result {
                // Nothing is deleted: the whole batch is published again (consumers dedupe).
                heads.clear();
                return Err(e);
            }
        }
        let mut tx = self.pool.begin().await?;
        let accounts: Vec<&str> = batch.iter().map(|r| r.account_id.as_str()).collect();
        let sequences: Vec<i64> = batch.iter().map(|r| r.sequence as i64).collect();
        let values: Vec<String> = chains.iter().map(|(_, v)| chain::to_hex(v)).collect();
        sqlx::query(
            "INSERT INTO event_chain (account_id, sequence, chain) \
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(&accounts)
        .bind(&sequences)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        let positions: Vec<i64> = batch.iter().map(|r| r.position).collect();
        sqlx::query("DELETE FROM outbox WHERE position = ANY($1)")
            .bind(&positions)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(batch.len())
    }

    /// The chain value before `sequence` of `account_id`.
    async fn previous_chain(
        &self,
        heads: &HashMap<String, (u64, [u8; 32])>,
        account_id: &str,
        sequence: u64,
    ) -> Result<[u8; 32], BusError> {
        if sequence <= 1 {
            return Ok(chain::GENESIS);
        }
        if let Some((s, v)) = heads.get(account_id) {
            if *s + 1 == sequence {
                return Ok(*v);
            }
        }
        let stored: Option<String> = sqlx::query_scalar(
            "SELECT chain FROM event_chain WHERE account_id = $1 AND sequence = $2",
        )
        .bind(account_id)
        .bind(sequence as i64 - 1)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(v) = stored.as_deref().and_then(chain::from_hex) {
            return Ok(v);
        }
        // Not recorded (the outbox was filled before the chain existed): recompute from
        // the account's stored events.
        let rows = sqlx::query(
            "SELECT sequence, payload::text AS payload FROM events \
             WHERE aggregate_type = 'Keyring' AND aggregate_id = $1 AND sequence < $2 ORDER BY sequence",
        )
        .bind(account_id)
        .bind(sequence as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut value = chain::GENESIS;
        for r in rows {
            let seq = r.get::<i64, _>("sequence").max(0) as u64;
            let event: KeyringEvent = serde_json::from_str(r.get("payload")).map_err(|e| {
                BusError::Store(crate::store::StoreError::Corrupt {
                    account_id: account_id.to_owned(),
                    sequence: seq as i64,
                    reason: e.to_string(),
                })
            })?;
            value = chain::next(&value, account_id, seq, &event);
        }
        Ok(value)
    }
}
