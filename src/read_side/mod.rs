//! The read side: the verification index in this process's memory (what `verify` answers
//! from), and the two read-model tables — [`listing`] (the Settings page) and [`index`]
//! (the persisted verification index) — which are projections of the log; what is folded
//! from the log only when asked — [`history`] (the listing at an instant, a key's history)
//! and [`timeline`] (telling and drawing it); [`first_use`], the verify path's signal
//! that a first-use rotation's successor was used; and [`usage`], which takes what the
//! verify path counts (in the index's own entries) to the usage table.
//!
//! The in-memory index is a fold that skips what it has applied, so feeding it is the same
//! whether events come right after this process's commit, from the store at start-up, from
//! another instance's commit (LISTEN), or from the events topic (the bus's follower). A gap
//! — an event whose predecessors this process has not seen — is filled from the store
//! first. At start it loads the newest snapshot of itself and replays only the accounts
//! whose head moved since ([`ReadSide::start`]); it writes a new snapshot from time to time
//! and at shutdown ([`ReadSide::keep_snapshots`]).

pub mod first_use;
pub mod history;
pub mod index;
pub mod legacy;
pub mod listing;
pub mod timeline;
pub mod usage;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keyledger_projections::{Lookup, VerificationIndex};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{same_mailbox, KeyHasher, LoginEmail, PresentedKey};
use crate::projection::{self, Projection};
use crate::store::{Store, StoreError, StoredRecord};
use listing::ListingTable;

/// Why a key did not verify (for logs; the public error is the same for every reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rejection {
    Malformed,
    Unknown,
    Expired,
    Revoked,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unknown => "unknown",
            Rejection::Expired => "expired",
            Rejection::Revoked => "revoked",
        }
    }
}

/// The facts of a valid key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidKey {
    pub account_id: String,
    pub key_id: Uuid,
    pub label: String,
    pub expires_at: DateTime<Utc>,
    /// Present when a `from` address was asked about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_allowed: Option<bool>,
}

pub type VerifyOutcome = Result<ValidKey, Rejection>;

/// A valid key's facts, borrowed from the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub key: keyledger_projections::Verified<'a>,
    pub from_allowed: Option<bool>,
}

/// How the index got ready at start.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartStats {
    /// Whether a snapshot was loaded (else the whole log was replayed).
    pub from_snapshot: bool,
    /// Events applied after the snapshot (or in the replay).
    pub events: u64,
    pub accounts: u64,
    pub seconds: f64,
}

/// How often the index is snapshotted while it changes.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(600);

pub struct ReadSide {
    index: RwLock<VerificationIndex>,
    hasher: KeyHasher,
    default_from: Option<String>,
    /// Postman's fixed bcrypt salt (`$2b$10$` + 22 characters), for legacy keys.
    legacy_salt: Option<String>,
    /// Whether this process writes the listing table after each of its commits (no bus),
    /// or leaves it to the projector (bus on).
    listing_in_process: AtomicBool,
    /// Events applied to the index since start (to know when a snapshot is worth it).
    changes: AtomicU64,
    /// Legacy keys migrated since start (a remembered legacy miss may match one of them).
    legacy_migrations: AtomicU64,
    /// Successors of first-use rotations verified here, for [`crate::rotation`].
    first_use: first_use::FirstUseSignal,
    /// Whether a successful verify is counted for the usage table.
    track_usage: AtomicBool,
}

/// What a presented key is to keyledger, whatever its state (for a leak report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identified {
    /// Not shaped like a key.
    Malformed,
    /// Key-shaped, but no key keyledger holds.
    Unknown,
    /// A key keyledger holds or held (live or not: its keyring decides).
    Known { account_id: String, key_id: Uuid },
}

impl ReadSide {
    pub fn new(hasher: KeyHasher, default_from: Option<String>) -> Self {
        let default_from = normalise(default_from);
        Self {
            index: RwLock::new(VerificationIndex::new()),
            hasher,
            default_from,
            legacy_salt: None,
            listing_in_process: true.into(),
            changes: AtomicU64::new(0),
            legacy_migrations: AtomicU64::new(0),
            first_use: Default::default(),
            track_usage: true.into(),
        }
    }

    /// A read side over an index built elsewhere (benchmarks, tools).
    pub fn with_index(
        hasher: KeyHasher,
        default_from: Option<String>,
        index: VerificationIndex,
    ) -> Self {
        Self {
            index: RwLock::new(index),
            hasher,
            default_from,
            legacy_salt: None,
            listing_in_process: true.into(),
            changes: AtomicU64::new(0),
            legacy_migrations: AtomicU64::new(0),
            first_use: Default::default(),
            track_usage: true.into(),
        }
    }

    /// Enables the legacy slow path with Postman's fixed bcrypt salt.
    pub fn with_legacy_salt(mut self, salt: Option<String>) -> Self {
        self.legacy_salt = salt;
        self
    }

    /// Whether migrated legacy keys may verify here (Postman's salt is configured): then an
    /// unknown well-formed key goes through [`legacy::LegacyGate`].
    pub fn legacy_enabled(&self) -> bool {
        self.legacy_salt.is_some()
    }

    /// The keyed hash of a well-formed presented key.
    pub fn keyed_hash(&self, presented: &str) -> Option<[u8; 32]> {
        PresentedKey::parse(presented)
            .ok()
            .map(|k| self.hasher.hash(k.as_str()))
    }

    /// Whether `presented`'s username has a legacy key that is neither revoked nor expired.
    pub fn has_live_legacy_candidate(&self, presented: &str, now: DateTime<Utc>) -> bool {
        let Ok(key) = PresentedKey::parse(presented) else {
            return false;
        };
        let index = self.index();
        index
            .legacy_candidates(key.username())
            .iter()
            .any(|c| matches!(index.judge_legacy(c, now), Lookup::Valid(_)))
    }

    /// The slow path for migrated legacy keys: bcrypt of the secret part under the fixed
    /// legacy salt, compared with each candidate of that username (Postman's scheme, tens
    /// of milliseconds). A match is linked into the fast path for next time (in memory
    /// only: the BLAKE3 hash, never the key).
    pub fn verify_legacy(
        &self,
        presented: &str,
        from: Option<&str>,
        now: DateTime<Utc>,
    ) -> VerifyOutcome {
        if PresentedKey::parse(presented).is_err() {
            return Err(Rejection::Malformed);
        }
        if self.link_legacy_match(presented, now) {
            return self.verify(presented, from, now);
        }
        Err(Rejection::Unknown)
    }

    /// Whether `presented` is a live migrated legacy key (bcrypt against each live
    /// candidate of its username); a match is linked into the fast path, nothing counted.
    pub fn link_legacy_match(&self, presented: &str, now: DateTime<Utc>) -> bool {
        let Ok(key) = PresentedKey::parse(presented) else {
            return false;
        };
        let candidates: Vec<_> = {
            let index = self.index();
            index
                .legacy_candidates(key.username())
                .iter()
                .filter(|c| matches!(index.judge_legacy(c, now), Lookup::Valid(_)))
                .cloned()
                .collect()
        };
        for candidate in candidates {
            if self.is_legacy_key(&key, &candidate.legacy_hash) {
                let hash = self.hasher.hash(key.as_str());
                self.index_mut().link_legacy(&hash, &candidate);
                return true;
            }
        }
        false
    }

    /// Whether `presented` is the legacy key stored as `legacy_hash`
    /// (`{username}_v1_{bcrypt without the salt}`): Postman's scheme, tens of milliseconds
    /// of CPU — callers run it on the legacy gate's worker. False without the legacy salt.
    pub fn is_legacy_key(&self, presented: &PresentedKey<'_>, legacy_hash: &str) -> bool {
        let Some(salt) = self.legacy_salt.as_deref() else {
            return false;
        };
        let Some((username, tail)) = legacy_hash.split_once("_v1_") else {
            return false;
        };
        username == presented.username()
            && bcrypt::verify(presented.secret(), &format!("{salt}{tail}")).unwrap_or(false)
    }

    /// Leaves the listing table to the projector (the bus is on).
    pub fn leave_listing_to_projector(&self) {
        self.listing_in_process.store(false, Ordering::SeqCst);
    }

    /// Replaces the whole index.
    pub fn install(&self, index: VerificationIndex) {
        *self.index_mut() = index;
    }

    /// Folds one event into the in-memory index only (skipped if already applied).
    pub fn apply_in_memory(
        &self,
        account_id: &str,
        sequence: u64,
        event: &keyledger_events::KeyringEvent,
    ) {
        if self.index_mut().apply(account_id, sequence, event) {
            self.changes.fetch_add(1, Ordering::Relaxed);
            self.note_legacy(event);
            note_lag(event);
        }
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, VerificationIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, VerificationIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the index current: the newest snapshot, then only the accounts whose head
    /// (`heads`, from [`Store::account_heads`]) moved since; without a usable snapshot, a
    /// replay of the whole log.
    pub async fn start(
        &self,
        store: &Store,
        heads: &[(String, u64)],
    ) -> Result<StartStats, StoreError> {
        let started = Instant::now();
        let snapshot = match store.load_index_snapshot().await {
            Ok(Some(bytes)) => match VerificationIndex::from_snapshot(&bytes) {
                Ok(index) => Some(index),
                Err(e) => {
                    tracing::warn!(error = %e, "the index snapshot is unusable; replaying the log");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the index snapshot; replaying the log");
                None
            }
        };
        let from_snapshot = snapshot.is_some();
        crate::metrics::metrics().set(INDEX_LAG, &[], 0.0);
        *self.index_mut() = snapshot.unwrap_or_default();
        self.changes.store(0, Ordering::Relaxed);
        let (events, accounts) = self.catch_up(store, heads).await?;
        self.index_mut().shrink_to_fit();
        release_freed_memory();
        if !from_snapshot {
            // Worth a snapshot even when the log is empty: the next start reads it.
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(StartStats {
            from_snapshot,
            events,
            accounts,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Applies what the index has not seen of the store: the accounts whose head is past
    /// what the index applied (a comparison, not a read of the log). Returns (events,
    /// accounts) applied.
    pub async fn catch_up(
        &self,
        store: &Store,
        heads: &[(String, u64)],
    ) -> Result<(u64, u64), StoreError> {
        let behind: Vec<(&str, u64)> = {
            let index = self.index();
            heads
                .iter()
                .filter_map(|(account, head)| {
                    let applied = index.applied(account);
                    (*head > applied).then_some((account.as_str(), applied))
                })
                .collect()
        };
        let accounts = behind.len() as u64;
        let mut events = 0u64;
        if behind.len() > 1000 {
            // Much of the log is new to the index: one pass over it beats a query per account.
            let mut pages = store.pages();
            while let Some(page) = pages.next().await? {
                for (account, records) in page {
                    events += self.apply_all(&account, &records);
                }
            }
        } else {
            for (account, applied) in behind {
                let records = store.events_after(account, applied).await?;
                events += self.apply_all(account, &records);
            }
        }
        Ok((events, accounts))
    }

    /// Writes a snapshot of the index when it changed since the last one.
    pub async fn snapshot(&self, store: &Store) -> Result<bool, StoreError> {
        let changes = self.changes.swap(0, Ordering::Relaxed);
        if changes == 0 {
            return Ok(false);
        }
        let (bytes, events) = {
            let index = self.index();
            let events: u64 = index.applied_sequences().map(|(_, s)| s).sum();
            (index.to_snapshot(), events)
        };
        if let Err(e) = store.save_index_snapshot(&bytes, events).await {
            self.changes.fetch_add(changes, Ordering::Relaxed);
            return Err(e);
        }
        Ok(true)
    }

    /// Snapshots the index every [`SNAPSHOT_EVERY`] while it changes, and once more when
    /// stopped, so the next start replays little.
    pub async fn keep_snapshots(
        self: std::sync::Arc<Self>,
        store: std::sync::Arc<Store>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        // The first soon after start, when the start had to replay.
        let mut wait = Duration::from_secs(5);
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = stop.changed() => true,
            };
            match self.snapshot(&store).await {
                Ok(true) => {
                    tracing::info!(keys = self.index().stats().keys, "index snapshot written")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot write the index snapshot"),
            }
            if stopping {
                return;
            }
            wait = SNAPSHOT_EVERY;
        }
    }

    /// Applies freshly committed `records` of one account (in order) to the index — always
    /// first, so a revocation is refused at once whatever happens next — and, without the
    /// bus, to the listing table.
    pub async fn apply_committed(
        &self,
        store: &Store,
        account_id: &str,
        records: &[StoredRecord],
    ) -> Result<(), StoreError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let applied = self.index().applied(account_id);
        if first.sequence > applied + 1 {
            // Another writer got ahead of this process: the records in between first.
            let fetched = store.events_after(account_id, applied).await;
            if let Ok(missing) = fetched {
                self.apply_all(account_id, &missing);
            }
        }
        // (Without the records in between, the committed ones still count: a revocation
        // must be refused at once.)
        self.apply_all(account_id, records);
        if self.listing_in_process.load(Ordering::SeqCst) {
            let batch = [(account_id.to_owned(), records.to_vec())];
            projection::apply(store, &[&ListingTable as &dyn Projection], &batch, None).await?;
        }
        Ok(())
    }

    /// Folds `records` of one account into the index; returns how many were new.
    fn apply_all(&self, account_id: &str, records: &[StoredRecord]) -> u64 {
        let mut index = self.index_mut();
        let mut applied = 0;
        for r in records {
            if index.apply(account_id, r.sequence, &r.event) {
                applied += 1;
                self.note_legacy(&r.event);
            }
        }
        self.changes.fetch_add(applied, Ordering::Relaxed);
        applied
    }

    fn note_legacy(&self, event: &keyledger_events::KeyringEvent) {
        if matches!(event, keyledger_events::KeyringEvent::LegacyKeyMigrated(_)) {
            self.legacy_migrations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many legacy keys were migrated since start.
    pub fn legacy_migrations(&self) -> u64 {
        self.legacy_migrations.load(Ordering::Relaxed)
    }

    /// Brings one account up to date from the store (after another instance wrote to it).
    pub async fn catch_up_account(
        &self,
        store: &Store,
        account_id: &str,
    ) -> Result<(), StoreError> {
        let applied = self.index().applied(account_id);
        let records = store.events_after(account_id, applied).await?;
        self.apply_all(account_id, &records);
        if let Some(last) = records.last() {
            note_lag(&last.event);
        }
        Ok(())
    }

    /// Keeps the index current with other instances' commits (PostgreSQL without the bus):
    /// each notification names an account, caught up from the store; when the listening
    /// connection was lost (notifications may have been missed), everything behind.
    pub async fn follow_other_writers(
        self: std::sync::Arc<Self>,
        mut listener: sqlx::postgres::PgListener,
        store: std::sync::Arc<Store>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let next = tokio::select! {
                n = listener.try_recv() => n,
                _ = stop.changed() => return,
            };
            let caught = match next {
                Ok(Some(n)) => self.catch_up_account(&store, n.payload()).await,
                Ok(None) => {
                    tracing::warn!("lost the LISTEN connection; catching up to miss nothing");
                    match store.account_heads().await {
                        Ok(heads) => self.catch_up(&store, &heads).await.map(|_| ()),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(())
                }
            };
            if let Err(e) = caught {
                tracing::warn!(error = %e, "cannot catch up with another instance's commit");
            }
        }
    }

    /// Verifies a presented key as of `now` and hands the verdict, borrowed from the index
    /// (no allocation), to `f`. The from-address rule is answered when `from` is given.
    pub fn verify_with<R>(
        &self,
        presented: &str,
        from: Option<&str>,
        now: DateTime<Utc>,
        f: impl FnOnce(Result<Verdict<'_>, Rejection>) -> R,
    ) -> R {
        let Ok(key) = PresentedKey::parse(presented) else {
            return f(Err(Rejection::Malformed));
        };
        let hash = self.hasher.hash(key.as_str());
        let index = self.index();
        let verdict = match index.lookup(&hash, now) {
            Lookup::Valid(v) => {
                if self.track_usage.load(Ordering::Relaxed) {
                    v.note_use();
                }
                if v.retires().is_some() {
                    self.first_use.signal(v.account_id(), v.key_id());
                }
                Ok(Verdict {
                    from_allowed: from.map(|f| self.may_send_as(f, v.login_email())),
                    key: v,
                })
            }
            Lookup::Unknown => Err(Rejection::Unknown),
            Lookup::Expired => Err(Rejection::Expired),
            Lookup::Revoked => Err(Rejection::Revoked),
        };
        f(verdict)
    }

    /// Whether successful verifications are counted for the usage table (on unless turned
    /// off, which only the benchmarks do, to measure what counting costs).
    pub fn set_usage_tracking(&self, on: bool) {
        self.track_usage.store(on, Ordering::Relaxed);
    }

    /// What `presented` is, without verifying it: no usage counted, no first use signalled.
    /// Keys of keyledger's own only; a migrated legacy key needs [`Self::verify_legacy`].
    pub fn identify(&self, presented: &str) -> Identified {
        let Ok(key) = PresentedKey::parse(presented) else {
            return Identified::Malformed;
        };
        let hash = self.hasher.hash(key.as_str());
        match self.index().find(&hash) {
            Some(k) => Identified::Known {
                account_id: k.account_id().to_owned(),
                key_id: k.key_id(),
            },
            None => Identified::Unknown,
        }
    }

    /// Verifies a presented key as of `now`, answering with owned facts.
    pub fn verify(&self, presented: &str, from: Option<&str>, now: DateTime<Utc>) -> VerifyOutcome {
        self.verify_with(presented, from, now, |verdict| {
            verdict.map(|v| ValidKey {
                account_id: v.key.account_id().to_owned(),
                key_id: v.key.key_id(),
                label: v.key.label().to_owned(),
                expires_at: v.key.expires_at(),
                from_allowed: v.from_allowed,
            })
        })
    }

    /// The custom-from-address rule: the account's login email, or the service's default
    /// sender.
    fn may_send_as(&self, from: &str, login_email: &str) -> bool {
        same_mailbox(login_email, from)
            || self
                .default_from
                .as_deref()
                .is_some_and(|d| same_mailbox(d, from))
    }

    /// Where first uses of first-use rotations' successors are handed over.
    pub fn first_use(&self) -> &first_use::FirstUseSignal {
        &self.first_use
    }

    /// Keys and accounts in the index, and its heap size.
    pub fn index_stats(&self) -> keyledger_projections::IndexStats {
        self.index().stats()
    }
}

/// The gauge of how far behind other instances' commits this instance's index is.
const INDEX_LAG: &str = "keyledger_index_lag_seconds";

/// Records how long `event`, just applied from another instance's commit (the events
/// topic, or LISTEN), took to reach this index: from the time the aggregate recorded on it
/// to now. (A reminder carries its due time, not its recording time: left out.)
fn note_lag(event: &keyledger_events::KeyringEvent) {
    if matches!(event, keyledger_events::KeyringEvent::ExpiryReminderDue(_)) {
        return;
    }
    let lag = (Utc::now() - event.occurred_at())
        .num_microseconds()
        .unwrap_or(i64::MAX);
    crate::metrics::metrics().set(INDEX_LAG, &[], lag.max(0) as f64 / 1e6);
}

/// Gives the memory a bulk load freed back to the system (glibc keeps it otherwise, and
/// the resident set would count a snapshot's bytes long after they were dropped).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn normalise(address: Option<String>) -> Option<String> {
    address
        .and_then(|a| LoginEmail::parse(&a).ok())
        .map(|l| l.as_str().to_owned())
}
