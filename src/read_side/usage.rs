//! Usage: which keys are verified, how often, when last — counted by the verify path in
//! the index's own entries (one relaxed atomic add on the entry the lookup has just read)
//! and taken to the usage table every few seconds by [`UsageFlusher`]. A key counted
//! since the last flush was used since: its last use is recorded as the time of this
//! flush, so `last_used_at` is exact to one flush interval (5 s by default) — the price
//! of keeping the counter within the entry's padding and the hot path to one instruction.
//!
//! Each instance adds what it counted since its last flush, so the table holds the sum
//! over instances. A flush that fails gives its counts back to the entries, to be added by
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
    /// Takes every count made since the last call (see [`Self::restore_usage`]).
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

    /// Gives back counts that could not be stored.
    pub fn restore_usage(&self, usage: &[Usage]) {
        self.index().restore_usage(usage);
    }
}

/// What one flush wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    pub keys: usize,
    pub verifications: u64,
}

/// Takes the counts to the usage table every `every`, and once more when stopped.
pub struct UsageFlusher {
    pub read_side: Arc<ReadSide>,
    pub store: Arc<Store>,
    pub every: Duration,
}

const FLUSH_LAG: &str = "keyledger_usage_flush_lag_seconds";

impl UsageFlusher {
    /// Writes what was counted since the last flush (given back on failure).
    pub async fn flush(&self) -> Result<Flushed, StoreError> {
        let now = Utc::now();
        let drained = self.read_side.drain_usage();
        let mut merged: HashMap<uuid::Uuid, Counted> = HashMap::with_capacity(drained.len());
        for u in &drained {
            let c = merged.entry(u.key_id).or_insert_with(|| Counted {
                key_id: u.key_id,
                account_id: u.account_id.clone(),
                verifications: 0,
                last_used_s: now.timestamp(),
            });
            c.verifications += i64::from(u.verifications);
        }
        let counted: Vec<Counted> = merged.into_values().collect();
        let flushed = Flushed {
            keys: counted.len(),
            verifications: counted.iter().map(|c| c.verifications as u64).sum(),
        };
        if let Err(e) = table::record(&self.store, &counted, table::day_of(now)).await {
            self.read_side.restore_usage(&drained);
            return Err(e);
        }
        Ok(flushed)
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let metrics = crate::metrics::metrics();
        let mut last_success = Instant::now();
        let mut pruned_day = None;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(self.every) => false,
                _ = stop.changed() => true,
            };
            match self.flush().await {
                Ok(f) => {
                    // The oldest count this flush carried was at most this old.
                    metrics.set(FLUSH_LAG, &[], last_success.elapsed().as_secs_f64());
                    last_success = Instant::now();
                    metrics.count("keyledger_usage_flushed_total", &[], f.verifications);
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
