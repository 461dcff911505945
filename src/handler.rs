//! The command handler: the one writer path for HTTP, the CLI, the bus and the saga.
//!
//! For each command it loads the account's keyring, answers a redelivered `command_id`
//! with its original outcome, mints key material when the command needs a new key (so
//! the aggregate stays pure and the plaintext never reaches it), lets the aggregate decide,
//! commits, and feeds the read side before answering (read-your-writes). Commands on one
//! account are serialised in this process; across processes, cqrs-es's optimistic
//! concurrency decides and a conflict is retried a bounded number of times.
//!
//! The keyring an account's last command left behind is kept in memory (a bounded cache),
//! so the next command on that account reads only what other instances appended since
//! (usually nothing) instead of its whole history. Should another instance still commit in
//! between, the commit conflicts on the sequence and the command is decided again on the
//! account read afresh: the cache can make a command retry, never decide on stale state.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::EventStoreAggregateContext;
use cqrs_es::{Aggregate, AggregateError};
use keyledger_events::{Command, KeyringEvent};
use rand::Rng;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::domain::{mint_key, seal, AccountId, KeyHasher, LogSigner, LoginEmail, PlaintextKey};
use crate::keyring::{
    KeyFacts, Keyring, KeyringCommand, KeyringError, KeyringServices, NewKeyMaterial,
};
use crate::read_side::ReadSide;
use crate::store::metadata as meta;
use crate::store::{CommandRecord, LoadedKeyring, Store, StoredRecord};
use keyledger_events::chain;

/// Attempts per command when another writer commits to the same account first.
pub const MAX_ATTEMPTS: usize = 8;
const LOCK_STRIPES: usize = 1024;
/// Keyrings kept in memory between commands.
const CACHED_KEYRINGS: usize = 4096;

/// A command to execute.
#[derive(Debug, Clone)]
pub struct Request {
    pub account_id: AccountId,
    pub command_id: Uuid,
    /// Who issued it — a token's name, `saga`, `bus:<issued_by>` — kept with its events.
    pub actor: String,
    pub command: Command,
    /// Over the bus, the sender's public key: a new key is sealed to it and the sealed box
    /// kept with the outcome, so a redelivery gets the same key.
    pub reply_key: Option<crypto_box::PublicKey>,
}

impl Request {
    /// The command's fingerprint: what a reused command id must match. A reminder's usage
    /// is left out: the saga reads it afresh each time it fires the same stage.
    fn fingerprint(&self) -> String {
        let mut command = self.command.clone();
        if let Command::SendExpiryReminder {
            last_used_at,
            usage_since,
            ..
        } = &mut command
        {
            (*last_used_at, *usage_since) = (None, None);
        }
        let bytes = serde_json::to_vec(&command).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// Whether the command was applied now or had been already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Accepted,
    Duplicate,
}

/// What a command did.
#[derive(Debug)]
pub struct Outcome {
    pub status: Status,
    /// The sequences of the events it recorded (empty when it changed nothing).
    pub sequences: Vec<u64>,
    pub events: Vec<KeyringEvent>,
    /// The key it created or acted on, as it stands after the command.
    pub key: Option<KeyFacts>,
    /// For a rotation: the old key as it stands after the command.
    pub rotated: Option<KeyFacts>,
    /// The new key in the clear: only for an accepted GenerateKey or RotateKey.
    pub api_key: Option<PlaintextKey>,
    /// The new key sealed to the request's `reply_key` — for a redelivery too.
    pub sealed_api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Rejected(#[from] KeyringError),
    #[error("this command id was used before for another command")]
    IdempotencyKeyReused,
    #[error("the account is too busy: {MAX_ATTEMPTS} attempts lost to concurrent writers")]
    Contended,
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
}

/// The saga issues its commands here, as the actor `saga`.
#[async_trait::async_trait]
impl crate::reminders::saga::Issuer for CommandHandler {
    async fn issue(
        &self,
        account_id: AccountId,
        command_id: Uuid,
        command: Command,
    ) -> crate::reminders::saga::Fired {
        use crate::reminders::saga::Fired;
        let request = Request {
            account_id,
            command_id,
            actor: "saga".into(),
            command,
            reply_key: None,
        };
        match self.execute(request).await {
            Ok(outcome) => Fired::Decided {
                events: outcome.events,
                status: match outcome.status {
                    Status::Accepted => "accepted",
                    Status::Duplicate => "duplicate",
                },
            },
            Err(HandleError::Rejected(e)) => Fired::Declined(e.code()),
            Err(e) => Fired::Failed(e.to_string()),
        }
    }
}

pub struct CommandHandler {
    store: Arc<Store>,
    services: KeyringServices,
    hasher: KeyHasher,
    signer: LogSigner,
    read_side: Arc<ReadSide>,
    locks: Vec<Mutex<()>>,
    cache: std::sync::Mutex<HashMap<String, LoadedKeyring>>,
    /// Names the account of every commit, for the projections that follow the store.
    commits: tokio::sync::broadcast::Sender<String>,
}

impl CommandHandler {
    pub fn new(
        store: Arc<Store>,
        services: KeyringServices,
        hasher: KeyHasher,
        signer: LogSigner,
        read_side: Arc<ReadSide>,
    ) -> Self {
        Self {
            store,
            services,
            hasher,
            signer,
            read_side,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            cache: std::sync::Mutex::new(HashMap::new()),
            commits: tokio::sync::broadcast::channel(4096).0,
        }
    }

    /// A receiver of the account id of every commit this handler makes from now on.
    pub fn subscribe_commits(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.commits.subscribe()
    }

    pub fn services(&self) -> &KeyringServices {
        &self.services
    }

    fn lock_for(&self, account: &AccountId) -> &Mutex<()> {
        let mut h = DefaultHasher::new();
        account.hash(&mut h);
        &self.locks[(h.finish() as usize) % LOCK_STRIPES]
    }

    /// Executes `request`: decided by the keyring, committed, fed to the read side.
    pub async fn execute(&self, request: Request) -> Result<Outcome, HandleError> {
        let kind = request.command.command_type().as_str();
        let result = self.execute_once(request).await;
        let outcome = match &result {
            Ok(o) if o.status == Status::Duplicate => "duplicate",
            Ok(_) => "accepted",
            Err(HandleError::Rejected(_)) => "rejected",
            Err(_) => "unavailable",
        };
        crate::metrics::metrics().count(
            "keyledger_commands_total",
            &[("type", kind), ("outcome", outcome)],
            1,
        );
        result
    }

    /// The account's keyring: from the cache (taken out: it goes back only after a
    /// successful command) with what was appended since, else from the store.
    async fn load(&self, account: &str) -> Result<LoadedKeyring, HandleError> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(account);
        let Some((mut context, mut head, mut commands)) = cached else {
            return self
                .store
                .load_with_chain(account)
                .await
                .map_err(unavailable);
        };
        let newer = self
            .store
            .events_after(account, context.current_sequence as u64)
            .await
            .map_err(|e| HandleError::Unavailable(e.to_string()))?;
        for r in newer {
            commands.extend(r.command);
            head = r
                .chain
                .as_deref()
                .and_then(chain::from_hex)
                .unwrap_or_else(|| chain::next(&head, account, r.sequence, &r.event));
            context
                .aggregate
                .apply(crate::keyring::StoredEvent(r.event));
            context.current_sequence = r.sequence as usize;
        }
        Ok((context, head, commands))
    }

    /// Keeps an account's keyring for its next command.
    fn keep(&self, account: &str, loaded: LoadedKeyring) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_KEYRINGS {
            if let Some(evicted) = cache.keys().next().cloned() {
                cache.remove(&evicted);
            }
        }
        cache.insert(account.to_owned(), loaded);
    }

    async fn execute_once(&self, request: Request) -> Result<Outcome, HandleError> {
        let _serialised = self.lock_for(&request.account_id).lock().await;
        let account = request.account_id.as_str();
        let fingerprint = request.fingerprint();
        for attempt in 0..MAX_ATTEMPTS {
            let (mut context, head, commands) = self.load(account).await?;
            let keyring = &mut context.aggregate;
            if let Some(prior) = keyring.prior_outcome(request.command_id) {
                let record = commands
                    .get(&request.command_id)
                    .cloned()
                    .unwrap_or_default();
                let reused = record
                    .fingerprint
                    .as_ref()
                    .is_some_and(|f| *f != fingerprint);
                let mut outcome = duplicate(keyring, prior.sequences.clone(), prior.key_id);
                outcome.sealed_api_key = record.sealed_api_key;
                self.keep(account, (context, head, commands));
                if reused {
                    return Err(HandleError::IdempotencyKeyReused);
                }
                return Ok(outcome);
            }
            let (material, api_key) = self.mint_for(keyring, &request.command);
            let command = KeyringCommand {
                command_id: request.command_id,
                command: request.command.clone(),
                material,
            };
            let sink = EventSink::default();
            keyring.handle(command, &self.services, &sink).await?;
            let events: Vec<_> = sink.collect().await;
            let (key, rotated) = affected(keyring, &events);
            if events.is_empty() {
                self.keep(account, (context, head, commands));
                return Ok(Outcome {
                    status: Status::Accepted,
                    sequences: vec![],
                    events: vec![],
                    key,
                    rotated,
                    api_key: None,
                    sealed_api_key: None,
                });
            }
            // The hash chain, recorded with the events it covers.
            let first_sequence = context.current_sequence as u64 + 1;
            let mut chains = Vec::with_capacity(events.len());
            let mut value = head;
            for (i, e) in events.iter().enumerate() {
                value = chain::next(&value, account, first_sequence + i as u64, &e.0);
                chains.push(value);
            }
            let signatures: Vec<String> = chains.iter().map(|c| self.signer.sign(c)).collect();
            let sealed_api_key = match (&api_key, &request.reply_key) {
                (Some(k), Some(to)) => Some(
                    seal::seal(to, k.expose().as_bytes())
                        .map_err(|e| HandleError::Unavailable(e.to_string()))?,
                ),
                _ => None,
            };
            let mut metadata = HashMap::from([
                (meta::COMMAND_ID.to_owned(), request.command_id.to_string()),
                (
                    "command_type".to_owned(),
                    request.command.command_type().as_str().to_owned(),
                ),
                (meta::ACTOR.to_owned(), request.actor.clone()),
                (meta::FINGERPRINT.to_owned(), fingerprint.clone()),
                (
                    "recorded_at".to_owned(),
                    self.services.clock.now().to_rfc3339(),
                ),
            ]);
            if let Some(sealed) = &sealed_api_key {
                metadata.insert(meta::SEALED_API_KEY.to_owned(), sealed.clone());
            }
            metadata.extend(chain::metadata(first_sequence, &chains));
            metadata.insert(chain::METADATA_SIGNATURES.to_owned(), signatures.join(","));
            // The state after these events, kept if the commit succeeds.
            let after = EventStoreAggregateContext {
                aggregate_id: context.aggregate_id.clone(),
                aggregate: context.aggregate.clone(),
                current_sequence: context.current_sequence + events.len(),
                current_snapshot: None,
            };
            match self.store.commit(events, context, metadata).await {
                Ok(committed) => {
                    let mut commands = commands;
                    commands.insert(
                        request.command_id,
                        CommandRecord {
                            fingerprint: Some(fingerprint.clone()),
                            sealed_api_key: sealed_api_key.clone(),
                        },
                    );
                    self.keep(account, (after, value, commands));
                    let records: Vec<StoredRecord> = committed
                        .into_iter()
                        .zip(chains.iter().zip(signatures))
                        .map(|(e, (c, signature))| StoredRecord {
                            chain: Some(chain::to_hex(c)),
                            signature: Some(signature),
                            actor: Some(request.actor.clone()),
                            command: None,
                            ..StoredRecord::bare(&e.aggregate_id, e.sequence as u64, e.payload.0)
                        })
                        .collect();
                    if let Err(e) = self
                        .read_side
                        .apply_committed(&self.store, account, &records)
                        .await
                    {
                        // The events are safely stored; the read side catches up on the next
                        // command of this account or at the next start.
                        tracing::error!(account_id = account, error = %e, "read side lags behind the store");
                    }
                    // Nobody listening (the bus feeds the projections) is fine.
                    let _ = self.commits.send(account.to_owned());
                    return Ok(Outcome {
                        status: Status::Accepted,
                        sequences: records.iter().map(|r| r.sequence).collect(),
                        events: records.into_iter().map(|r| r.event).collect(),
                        key,
                        rotated,
                        api_key,
                        sealed_api_key,
                    });
                }
                Err(AggregateError::AggregateConflict) => {
                    let backoff = rand::thread_rng().gen_range(1..=5u64) * (attempt as u64 + 1);
                    tracing::debug!(account_id = account, attempt, "concurrent write; retrying");
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
                Err(AggregateError::UserError(e)) => return Err(HandleError::Rejected(e)),
                Err(other) => return Err(unavailable(other)),
            }
        }
        Err(HandleError::Contended)
    }

    /// Mints a new key when the command needs one. Where the login email is unusable no
    /// material is minted and the aggregate rejects the command with the precise reason.
    fn mint_for(
        &self,
        keyring: &Keyring,
        command: &Command,
    ) -> (Option<NewKeyMaterial>, Option<PlaintextKey>) {
        let login = match command {
            Command::GenerateKey { login_email, .. } => {
                keyring.login_email().unwrap_or(login_email)
            }
            Command::RotateKey { .. } => keyring.login_email().unwrap_or_default(),
            Command::MigrateLegacyKey { .. } => {
                let material = NewKeyMaterial {
                    key_id: Uuid::now_v7(),
                    username: String::new(),
                    key_hash: String::new(),
                    last_five: String::new(),
                };
                return (Some(material), None);
            }
            _ => return (None, None),
        };
        let Ok(login) = LoginEmail::parse(login) else {
            return (None, None);
        };
        let username = login.username();
        let minted = mint_key(&username, &self.hasher);
        let material = NewKeyMaterial {
            key_id: Uuid::now_v7(),
            username,
            key_hash: minted.key_hash,
            last_five: minted.last_five,
        };
        (Some(material), Some(minted.plaintext))
    }
}

fn unavailable(e: AggregateError<KeyringError>) -> HandleError {
    match e {
        AggregateError::UserError(e) => HandleError::Rejected(e),
        other => HandleError::Unavailable(other.to_string()),
    }
}

/// The key a command created or acted on, and the old key of a rotation.
fn affected(
    keyring: &Keyring,
    events: &[crate::keyring::StoredEvent],
) -> (Option<KeyFacts>, Option<KeyFacts>) {
    let mut key = None;
    let mut rotated = None;
    for e in events {
        match &e.0 {
            KeyringEvent::KeyRotated(r) => rotated = keyring.key(r.old_key_id).cloned(),
            other => {
                if key.is_none() {
                    key = key_id_of(other).and_then(|k| keyring.key(k).cloned());
                }
            }
        }
    }
    (key, rotated)
}

fn key_id_of(event: &KeyringEvent) -> Option<Uuid> {
    match event {
        KeyringEvent::KeyGenerated(e) => Some(e.key_id),
        KeyringEvent::ContactsUpdated(e) => Some(e.key_id),
        KeyringEvent::KeyRevoked(e) => Some(e.key_id),
        KeyringEvent::KeyRotated(e) => Some(e.new_key_id),
        KeyringEvent::KeyExpired(e) => Some(e.key_id),
        KeyringEvent::LegacyKeyMigrated(e) => Some(e.key_id),
        KeyringEvent::ExpiryReminderDue(e) => Some(e.key_id),
    }
}

fn duplicate(keyring: &Keyring, sequences: Vec<u64>, key_id: Option<Uuid>) -> Outcome {
    let key = key_id.and_then(|k| keyring.key(k).cloned());
    let rotated = key
        .as_ref()
        .and_then(|k| k.rotated_from)
        .and_then(|old| keyring.key(old).cloned());
    Outcome {
        status: Status::Duplicate,
        sequences,
        events: vec![],
        key,
        rotated,
        api_key: None,
        sealed_api_key: None,
    }
}
