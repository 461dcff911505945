//! Usage: which keys are verified, how often, when last — counted by the verify path in
//! the index's own entries (one relaxed atomic add on the entry the lookup has just read)
//! and taken to the usage table every few seconds by [`UsageFlusher`]. A key counted
//! since the last flush was used since: its last use is recorded as the time of this
//! flush, so `last_used_at` is exact to one flush interval (5 s by default) — the price
//! of keeping the counter within the entry's padding and the hot path to one instruction.
//!
//! Each instance adds what it counted since its last flush, so the table holds the sum
//! over instances. A flush that fails keeps its counts (with the time they were taken) for
//! the next one; a crash loses at most one interval of counts (usage is a statistic, not a
//! fact of the log).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use keyledger_projections::Usage;
use tokio::sync::watch;

use super::ReadSide;
use crate::store::usage::{self as table, Counted};
use crate::store::{Store, StoreError};

/// Entries looked at per hold of the index's read lock (a writer waits at most this long).
const CHUNK: usize = 64 * 1024;

impl ReadSide {
    /// Takes every count made since the last call.
    pub fn drain_usage(&self) -> Vec<Usage> {
        let mut out = Vec::new();
        let mut from = Some(0);
        while let Some(at) = from {
            let (mut taken, next) = self.index().drain_usage(at, CHUNK);
            out.append(&mut taken);
            from = next;
        }
        out
    }
}

/// Takes the counts to the usage table every `every`, and once more when stopped.
pub struct UsageFlusher {
    read_side: Arc<ReadSide>,
    store: Arc<Store>,
    every: Duration,
    /// Counts drained but not yet written (a flush failed), with the time of the drain
    /// that took them: kept here, in 64 bits, until a flush succeeds.
    pending: HashMap<uuid::Uuid, Counted>,
}

const FLUSH_LAG: &str = "keyledger_usage_flush_lag_seconds";

impl UsageFlusher {
    pub fn new(read_side: Arc<ReadSide>, store: Arc<Store>, every: Duration) -> Self {
        Self {
            read_side,
            store,
            every,
            pending: Default::default(),
        }
    }

    /// Writes what was counted since the last successful flush (kept for the next one on
    /// failure); answers how many verifications were written. A key's last use is the
    /// time of the drain that last found it used.
    pub async fn flush(&mut self) -> Result<u64, StoreError> {
        let now = Utc::now();
        for u in self.read_side.drain_usage() {
            let c = self.pending.entry(u.key_id).or_insert_with(|| Counted {
                key_id: u.key_id,
                account_id: u.account_id,
                verifications: 0,
                last_used_s: 0,
            });
            c.verifications += i64::from(u.verifications);
            c.last_used_s = now.timestamp();
        }
        let mut counted: Vec<&Counted> = self.pending.values().collect();
        // One order for every instance: two flushes touching the same hot keys take their
        // row locks in the same order and cannot deadlock.
        counted.sort_unstable_by_key(|c| c.key_id);
        table::record(&self.store, &counted, table::day_of(now)).await?;
        let written = counted.iter().map(|c| c.verifications as u64).sum();
        self.pending.clear();
        Ok(written)
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let metrics = crate::metrics::metrics();
        let mut last_success = Instant::now();
        let mut pruned_day = None;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(self.every) => false,
                _ = stop.changed() => true,
            };
            match self.flush().await {
                Ok(written) => {
                    // The oldest count this flush carried was at most this old.
                    metrics.set(FLUSH_LAG, &[], last_success.elapsed().as_secs_f64());
                    last_success = Instant::now();
                    metrics.count("keyledger_usage_flushed_total", &[], written);
                }
                Err(e) => {
                    metrics.set(FLUSH_LAG, &[], last_success.elapsed().as_secs_f64());
                    tracing::warn!(error = %e, "cannot write key usage yet; kept for the next flush");
                }
            }
            let today = table::day_of(Utc::now());
            if pruned_day != Some(today) {
                match table::prune(&self.store, today - table::DAYS_KEPT).await {
                    Ok(_) => pruned_day = Some(today),
                    Err(e) => tracing::warn!(error = %e, "cannot prune old daily usage"),
                }
            }
            if stopping {
                return;
            }
        }
    }
}
