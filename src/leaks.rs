//! The leak desk: keys found where they should not be (a repository, a log, a ticket) are
//! revoked at once and their contacts told, whoever reports them — over HTTP
//! (`POST /v1/leaks`) or the bus (ReportLeak).
//!
//! Each string is identified against the verification index (no verify: no usage counted,
//! no first use signalled) — a migrated legacy key through the legacy gate, and what this
//! instance's memory does not hold (no in-memory index on a commands-only instance, or
//! one not caught up yet) through the persisted index. A key keyledger holds gets keyledger's own RevokeLeakedKey,
//! decided by its account's keyring like any command, whose KeyRevoked (`cause = leaked`,
//! with the source) the notifier turns into one email per contact. The answer says per key
//! `revoked`, `already_inactive`, `unknown` or `malformed` and names no account, label or
//! contact.
//!
//! Each key's command id is derived from the report's id and the key's id: a bus report
//! redelivered gets its original answers, and two reports of one key revoke it once.
//! A report's free text (source, reporter) is kept in the event and the email, with any
//! key-shaped string in it reduced to its last five (and what follows a `_v1_` that is
//! not a whole key — percent-encoded, escaped, cut — removed). The event's actor is the
//! caller (the token's name, `bus:<issued_by>`); the reporter's own words are a field of
//! the event.

use std::sync::Arc;

use keyledger_events::{Command, LeakOutcome, LeakResult};
use uuid::Uuid;

use crate::domain::api_key::{redact_keys, to_hex};
use crate::domain::{AccountId, Clock, PresentedKey};
use crate::handler::{CommandHandler, HandleError, Request, Status};
use crate::read_side::legacy::LegacyGate;
use crate::read_side::{index, Identified, ReadSide};
use crate::store::{Store, StoreError};

/// The most keys one report may hold.
pub const MAX_KEYS: usize = 100;
/// The longest source and reporter accepted, in characters.
pub const MAX_TEXT_CHARS: usize = 1000;

/// Why a report was refused as a whole (nothing was done).
#[derive(Debug, thiserror::Error)]
pub enum LeakError {
    #[error("keys must hold 1 to {MAX_KEYS} strings, not {0}")]
    KeyCount(usize),
    #[error("source must say where the keys were found (1 to {MAX_TEXT_CHARS} characters)")]
    Source,
    #[error("reporter must be at most {MAX_TEXT_CHARS} characters")]
    Reporter,
    /// The store could not be reached; keys answered before it failed may be revoked.
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
}

/// A leak report, checked. (Its `Debug` names no key.)
#[derive(Clone)]
pub struct Report {
    keys: Vec<String>,
    source: String,
    reporter: String,
}

impl Report {
    /// Checks the sizes; key-shaped strings in `source` and `reporter` are reduced to
    /// their last five (they are kept in the log and sent in emails).
    pub fn parse(keys: Vec<String>, source: &str, reporter: &str) -> Result<Self, LeakError> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(LeakError::KeyCount(keys.len()));
        }
        let source = source.trim();
        if source.is_empty() || source.chars().count() > MAX_TEXT_CHARS {
            return Err(LeakError::Source);
        }
        if reporter.chars().count() > MAX_TEXT_CHARS {
            return Err(LeakError::Reporter);
        }
        Ok(Self {
            keys,
            source: clean(source),
            reporter: clean(reporter.trim()),
        })
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Report")
            .field("keys", &self.keys.len())
            .field("source", &self.source)
            .field("reporter", &self.reporter)
            .finish()
    }
}

/// Free text as kept: no keys, no control characters (it goes into an email's body).
fn clean(text: &str) -> String {
    redact_keys(text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub struct LeakDesk {
    handler: Arc<CommandHandler>,
    read_side: Arc<ReadSide>,
    store: Arc<Store>,
    legacy: Arc<LegacyGate>,
    clock: Arc<dyn Clock>,
}

impl LeakDesk {
    pub fn new(
        handler: Arc<CommandHandler>,
        read_side: Arc<ReadSide>,
        store: Arc<Store>,
        legacy: Arc<LegacyGate>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            handler,
            read_side,
            store,
            legacy,
            clock,
        }
    }

    /// Handles `report` (id `report_id`, sent by `actor`): one result per key, in order.
    pub async fn report(
        &self,
        report_id: Uuid,
        actor: &str,
        report: &Report,
    ) -> Result<Vec<LeakResult>, LeakError> {
        let metrics = crate::metrics::metrics();
        let mut results = Vec::with_capacity(report.keys.len());
        for raw in &report.keys {
            let (result, now_revoked) = self.one(report_id, actor, report, raw.trim()).await?;
            metrics.count(
                "keyledger_leaks_reported_total",
                &[("result", result.as_str())],
                1,
            );
            if now_revoked {
                metrics.count("keyledger_keys_revoked_for_leaks_total", &[], 1);
            }
            results.push(LeakResult::of(raw, result));
        }
        tracing::info!(
            report_id = %report_id,
            actor,
            keys = results.len(),
            revoked = results.iter().filter(|r| r.result == LeakOutcome::Revoked).count(),
            "leak report handled"
        );
        Ok(results)
    }

    /// What became of one key, and whether this call revoked it (not a redelivery).
    async fn one(
        &self,
        report_id: Uuid,
        actor: &str,
        report: &Report,
        raw: &str,
    ) -> Result<(LeakOutcome, bool), LeakError> {
        let now = self.clock.now();
        let (account_id, key_id) = match self.read_side.identify(raw) {
            Identified::Malformed => return Ok((LeakOutcome::Malformed, false)),
            Identified::Known { account_id, key_id } => (account_id, key_id),
            Identified::Unknown => match self.not_in_memory(raw, now).await? {
                Some(found) => found,
                None => return Ok((LeakOutcome::Unknown, false)),
            },
        };
        let Ok(account_id) = AccountId::parse(&account_id) else {
            return Ok((LeakOutcome::Unknown, false));
        };
        // Issued even when the index says inactive: a redelivered report then gets its
        // original answer (`duplicate` of the same command id), and the keyring — not a
        // possibly lagging index — decides.
        let request = Request {
            account_id,
            command_id: Uuid::new_v5(&report_id, key_id.as_bytes()),
            actor: actor.to_owned(),
            command: Command::RevokeLeakedKey {
                key_id,
                source: report.source.clone(),
                reporter: report.reporter.clone(),
            },
            reply_key: None,
        };
        match self.handler.execute(request).await {
            Ok(outcome) => Ok((LeakOutcome::Revoked, outcome.status == Status::Accepted)),
            Err(HandleError::Rejected(_) | HandleError::IdempotencyKeyReused) => {
                Ok((LeakOutcome::AlreadyInactive, false))
            }
            Err(e @ (HandleError::Contended | HandleError::Unavailable(_))) => {
                Err(LeakError::Unavailable(e.to_string()))
            }
        }
    }

    /// A key the in-memory index does not know: a live migrated legacy key (Postman's
    /// bcrypt scheme, through the legacy gate), or — on an instance that keeps no in-memory
    /// index (the commands role alone), has not caught up yet, or has not met a revoked
    /// legacy key since it started — a key of the persisted index: by its hash, else a
    /// legacy key of its username in any state (bcrypt through the gate again).
    async fn not_in_memory(
        &self,
        raw: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<(String, Uuid)>, LeakError> {
        if self.read_side.legacy_enabled() {
            let found = self
                .legacy
                .identify(self.read_side.clone(), raw.to_owned(), now)
                .await;
            if found.is_some() {
                return Ok(found);
            }
        }
        let (Ok(key), Some(hash)) = (PresentedKey::parse(raw), self.read_side.keyed_hash(raw))
        else {
            return Ok(None);
        };
        let unavailable = |e: StoreError| LeakError::Unavailable(e.to_string());
        if let Some(found) = index::find_by_hash(&self.store, &to_hex(&hash))
            .await
            .map_err(unavailable)?
        {
            return Ok(Some(found));
        }
        if !self.read_side.legacy_enabled() {
            return Ok(None);
        }
        let candidates = index::legacy_of_username(&self.store, key.username())
            .await
            .map_err(unavailable)?;
        Ok(self
            .legacy
            .identify_among(self.read_side.clone(), raw.to_owned(), candidates)
            .await)
    }
}
