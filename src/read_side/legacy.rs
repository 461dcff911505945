//! The slow path for migrated legacy keys, made safe to leave open to anyone.
//!
//! A legacy key verifies by Postman's scheme: bcrypt of its secret under a fixed salt,
//! tens of milliseconds of CPU. Left as is, anyone could burn a core per request with
//! made-up keys of a username that has a legacy key, and the response time would tell
//! which usernames have one. So:
//! - only *live* candidates are tried (a revoked or expired legacy key costs nothing);
//! - bcrypt runs one at a time and at most `rate` times a second; past that the key is
//!   answered unknown (a legitimate legacy caller retries; legacy keys are on their way
//!   out anyway);
//! - it runs on a thread of its own at the lowest CPU priority (nice 19), so under load
//!   the verifications of ordinary keys go first;
//! - a miss is remembered (by its keyed hash), so the same wrong key costs one bcrypt;
//! - every unknown key of a well-formed shape takes about as long as a bcrypt would — an
//!   async wait, no CPU — whether or not one ran, so timing reveals nothing.
//!
//! Ordinary keys never come here: the fast path answers them first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;

use super::{ReadSide, Rejection, VerifyOutcome};
use crate::domain::PresentedKey;

/// Most misses remembered (then the memory is cleared and starts again).
const MISSES_KEPT: usize = 100_000;
/// What an unknown key's answer waits for before any bcrypt was measured.
const TYPICAL_BCRYPT: Duration = Duration::from_millis(60);

/// Counts one legacy check by its outcome (matched, missed, busy, limited).
fn checked(outcome: &'static str) {
    crate::metrics::metrics().count("keyledger_legacy_checks_total", &[("outcome", outcome)], 1);
}

/// One bcrypt check, run on the gate's worker thread.
type Check = Box<dyn FnOnce() + Send>;

/// The thread that runs the checks, at the lowest CPU priority.
fn spawn_worker() -> Option<std::sync::mpsc::Sender<Check>> {
    let (tx, rx) = std::sync::mpsc::channel::<Check>();
    std::thread::Builder::new()
        .name("legacy-bcrypt".into())
        .spawn(move || {
            // On Linux a thread is a task of its own: this lowers this thread only.
            // SAFETY: setpriority has no memory-safety preconditions.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            }
            while let Ok(check) = rx.recv() {
                check();
            }
        })
        .ok()?;
    Some(tx)
}

pub struct LegacyGate {
    one_at_a_time: Semaphore,
    worker: Mutex<Option<std::sync::mpsc::Sender<Check>>>,
    /// (tokens, when last refilled) of the rate limit.
    bucket: Mutex<(f64, Instant)>,
    per_second: f64,
    /// Keyed hashes that matched no legacy key, and the read side's count of legacy
    /// migrations when they were remembered (a new one clears them).
    misses: Mutex<(HashSet<[u8; 32]>, u64)>,
    /// A moving average of bcrypt's duration, in microseconds.
    typical_micros: Mutex<f64>,
}

impl LegacyGate {
    pub fn new(per_second: f64) -> Self {
        let per_second = per_second.max(0.1);
        Self {
            one_at_a_time: Semaphore::new(1),
            worker: Mutex::new(spawn_worker()),
            bucket: Mutex::new((per_second.max(1.0), Instant::now())),
            per_second,
            misses: Mutex::new((HashSet::new(), 0)),
            typical_micros: Mutex::new(TYPICAL_BCRYPT.as_micros() as f64),
        }
    }

    /// Runs `check` on the low-priority worker thread and returns its answer; None when
    /// the worker is gone.
    async fn on_worker<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Check = Box::new(move || {
            let _ = tx.send(check());
        });
        let handed = self
            .worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|w| w.send(job).is_ok());
        if !handed {
            return None;
        }
        rx.await.ok()
    }

    fn take_token(&self) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * self.per_second;
        // At least one check fits in the bucket, however low the rate.
        b.0 = (b.0 + refill).min(self.per_second.max(1.0));
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }

    fn typical(&self) -> Duration {
        let micros = *self
            .typical_micros
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Duration::from_micros(micros as u64)
    }

    fn measured(&self, took: Duration) {
        let mut t = self
            .typical_micros
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *t = 0.8 * *t + 0.2 * took.as_micros() as f64;
    }

    fn missed(&self, hash: [u8; 32]) {
        let mut m = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        if m.0.len() >= MISSES_KEPT {
            m.0.clear();
        }
        m.0.insert(hash);
    }

    /// Whether `hash` missed before, since the last legacy migration.
    fn missed_before(&self, hash: &[u8; 32], migrations: u64) -> bool {
        let mut m = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        if m.1 != migrations {
            m.0.clear();
            m.1 = migrations;
        }
        m.0.contains(hash)
    }

    /// Decides a well-formed key the fast path does not know: valid through a live legacy
    /// candidate, else unknown — in about the time of a bcrypt either way.
    pub async fn verify(
        &self,
        read_side: Arc<ReadSide>,
        presented: String,
        from: Option<String>,
        now: DateTime<Utc>,
    ) -> VerifyOutcome {
        let started = Instant::now();
        let outcome = self.decide(read_side, presented, from, now).await;
        if outcome.is_err() {
            let wait = self.typical().saturating_sub(started.elapsed());
            tokio::time::sleep(wait).await;
        }
        outcome
    }

    /// For a leak report: the live migrated legacy key `presented` is, if any (account,
    /// key id) — bcrypt on the gate's worker, one at a time, but waiting for its turn
    /// instead of giving up (a leaked key must not stay live because the gate was busy)
    /// and counting no use.
    pub async fn identify(
        &self,
        read_side: Arc<ReadSide>,
        presented: String,
        now: DateTime<Utc>,
    ) -> Option<(String, uuid::Uuid)> {
        if !read_side.has_live_legacy_candidate(&presented, now) {
            return None;
        }
        checked("leak-report");
        self.in_turn(move || {
            if !read_side.link_legacy_match(&presented, now) {
                return None;
            }
            match read_side.identify(&presented) {
                super::Identified::Known { account_id, key_id } => Some((account_id, key_id)),
                _ => None,
            }
        })
        .await
        .flatten()
    }

    /// For a leak report the in-memory index cannot answer: which of `candidates`
    /// (account, key id, legacy hash — from the persisted index, in any state) `presented`
    /// is. As [`Self::identify`]: bcrypt on the worker, waiting for its turn.
    pub async fn identify_among(
        &self,
        read_side: Arc<ReadSide>,
        presented: String,
        candidates: Vec<(String, uuid::Uuid, String)>,
    ) -> Option<(String, uuid::Uuid)> {
        if candidates.is_empty() {
            return None;
        }
        checked("leak-report");
        self.in_turn(move || {
            let key = PresentedKey::parse(&presented).ok()?;
            candidates
                .into_iter()
                .find(|(_, _, legacy_hash)| read_side.is_legacy_key(&key, legacy_hash))
                .map(|(account_id, key_id, _)| (account_id, key_id))
        })
        .await
        .flatten()
    }

    /// Runs `check` on the worker when it is this caller's turn (waiting for it) and
    /// returns its answer; None when the worker is gone.
    async fn in_turn<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _turn = self.one_at_a_time.acquire().await.ok()?;
        self.on_worker(check).await
    }

    async fn decide(
        &self,
        read_side: Arc<ReadSide>,
        presented: String,
        from: Option<String>,
        now: DateTime<Utc>,
    ) -> VerifyOutcome {
        let Some(hash) = read_side.keyed_hash(&presented) else {
            return Err(Rejection::Malformed);
        };
        if self.missed_before(&hash, read_side.legacy_migrations())
            || !read_side.has_live_legacy_candidate(&presented, now)
        {
            return Err(Rejection::Unknown);
        }
        let Ok(_turn) = self.one_at_a_time.try_acquire() else {
            checked("busy");
            return Err(Rejection::Unknown);
        };
        if !self.take_token() {
            checked("limited");
            return Err(Rejection::Unknown);
        }
        let bcrypt_started = Instant::now();
        let outcome = self
            .on_worker(move || read_side.verify_legacy(&presented, from.as_deref(), now))
            .await
            .unwrap_or(Err(Rejection::Unknown));
        self.measured(bcrypt_started.elapsed());
        checked(if outcome.is_ok() { "matched" } else { "missed" });
        if outcome.is_err() {
            self.missed(hash);
        }
        outcome
    }
}
