//! The read side in this process: the verification index in memory and the listing table,
//! fed from the event store.
//!
//! Both are folds over events that skip what they have already applied, so feeding them
//! is the same whether the events come right after a commit, from a replay at start-up, or
//! (later) from the events topic. A gap — an event whose predecessors this process has not
//! seen, because another writer committed them — is filled from the store first.

use std::sync::RwLock;
use std::time::Instant;

use chrono::{DateTime, Utc};
use keyledger_projections::{Lookup, VerificationIndex};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{same_mailbox, KeyHasher, LoginEmail, PresentedKey};
use crate::store::{Store, StoreError, StoredRecord, REPLAY_PAGE};

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

/// Figures of a replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayStats {
    pub events: u64,
    pub accounts: u64,
    pub seconds: f64,
}

pub struct ReadSide {
    index: RwLock<VerificationIndex>,
    hasher: KeyHasher,
    default_from: Option<String>,
    /// Postman's fixed bcrypt salt (`$2b$10$` + 22 characters), for legacy keys.
    legacy_salt: Option<String>,
    /// Whether this process writes the listing table after each commit (no bus), or
    /// leaves it to the projector (bus on).
    listing_in_process: std::sync::atomic::AtomicBool,
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
        }
    }

    /// Enables the legacy slow path with Postman's fixed bcrypt salt.
    pub fn with_legacy_salt(mut self, salt: Option<String>) -> Self {
        self.legacy_salt = salt;
        self
    }

    /// Whether `presented` is unknown to the fast path but could be a migrated legacy key
    /// (same username) — then [`ReadSide::verify_legacy`] decides, off the async threads.
    pub fn needs_legacy_check(&self, presented: &str) -> bool {
        let Ok(key) = PresentedKey::parse(presented) else {
            return false;
        };
        self.legacy_salt.is_some() && !self.index().legacy_candidates(key.username()).is_empty()
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
        let Ok(key) = PresentedKey::parse(presented) else {
            return Err(Rejection::Malformed);
        };
        let Some(salt) = self.legacy_salt.as_deref() else {
            return Err(Rejection::Unknown);
        };
        let candidates = self.index().legacy_candidates(key.username()).to_vec();
        for candidate in candidates {
            let tail = candidate.legacy_hash.rsplit('_').next().unwrap_or_default();
            if bcrypt::verify(key.secret(), &format!("{salt}{tail}")).unwrap_or(false) {
                let hash = self.hasher.hash(key.as_str());
                self.index_mut().link_legacy(&hash, &candidate);
                return self.verify(presented, from, now);
            }
        }
        Err(Rejection::Unknown)
    }

    /// Leaves the listing table to the projector (the bus is on).
    pub fn leave_listing_to_projector(&self) {
        self.listing_in_process
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Replaces the whole index (after loading a persisted one).
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
        self.index_mut().apply(account_id, sequence, event);
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, VerificationIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, VerificationIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replays the whole store into the index and brings the listing table up to date.
    pub async fn rebuild(&self, store: &Store) -> Result<ReplayStats, StoreError> {
        let started = Instant::now();
        let checkpoints = store.listing_checkpoints().await?;
        let mut fresh = VerificationIndex::new();
        let mut stats = ReplayStats::default();
        let mut after: Option<(String, u64)> = None;
        let mut behind: Vec<StoredRecord> = Vec::new();
        loop {
            let page = store
                .events_page(after.as_ref().map(|(a, s)| (a.as_str(), *s)), REPLAY_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some((last.account_id.clone(), last.sequence));
            for record in page {
                if fresh.applied(&record.account_id) == 0 {
                    stats.accounts += 1;
                }
                fresh.apply(&record.account_id, record.sequence, &record.event);
                stats.events += 1;
                let checkpoint = checkpoints.get(&record.account_id).copied().unwrap_or(0);
                if record.sequence > checkpoint {
                    if behind
                        .last()
                        .is_some_and(|b| b.account_id != record.account_id)
                    {
                        flush_listing(store, &mut behind).await?;
                    }
                    behind.push(record);
                }
            }
        }
        flush_listing(store, &mut behind).await?;
        fresh.shrink_to_fit();
        *self.index_mut() = fresh;
        stats.seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Applies freshly committed `records` of one account (in order) to both read models.
    pub async fn apply_committed(
        &self,
        store: &Store,
        account_id: &str,
        records: &[StoredRecord],
    ) -> Result<(), StoreError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        // The listing table: fill a gap from the store if another writer got ahead.
        if self
            .listing_in_process
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            match store.apply_to_listing(account_id, records).await {
                Err(StoreError::Gap { checkpoint }) => {
                    let missing = store.events_after(account_id, checkpoint).await?;
                    store.apply_to_listing(account_id, &missing).await?;
                }
                other => other?,
            }
        }
        // The index: the same.
        let applied = self.index().applied(account_id);
        let fetched;
        let to_apply: &[StoredRecord] = if first.sequence > applied + 1 {
            fetched = store.events_after(account_id, applied).await?;
            &fetched
        } else {
            records
        };
        let mut index = self.index_mut();
        for r in to_apply {
            index.apply(account_id, r.sequence, &r.event);
        }
        Ok(())
    }

    /// Brings one account up to date from the store (after another instance wrote to it).
    pub async fn catch_up_account(
        &self,
        store: &Store,
        account_id: &str,
    ) -> Result<(), StoreError> {
        let applied = self.index().applied(account_id);
        let records = store.events_after(account_id, applied).await?;
        self.apply_committed(store, account_id, &records).await
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
            Lookup::Valid(v) => Ok(Verdict {
                from_allowed: from.map(|f| self.may_send_as(f, v.login_email())),
                key: v,
            }),
            Lookup::Unknown => Err(Rejection::Unknown),
            Lookup::Expired => Err(Rejection::Expired),
            Lookup::Revoked => Err(Rejection::Revoked),
        };
        f(verdict)
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

    /// Keys and accounts in the index, and its heap size.
    pub fn index_stats(&self) -> keyledger_projections::IndexStats {
        self.index().stats()
    }
}

fn normalise(address: Option<String>) -> Option<String> {
    address
        .and_then(|a| LoginEmail::parse(&a).ok())
        .map(|l| l.as_str().to_owned())
}

async fn flush_listing(store: &Store, behind: &mut Vec<StoredRecord>) -> Result<(), StoreError> {
    if let Some(first) = behind.first() {
        let account = first.account_id.clone();
        store.apply_to_listing(&account, behind).await?;
    }
    behind.clear();
    Ok(())
}
