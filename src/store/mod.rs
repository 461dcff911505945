//! Persistence: the event store (postgres-es or sqlite-es) and the tables next to it.
//!
//! cqrs-es gives loading, committing and optimistic concurrency; what it does not give is
//! written here once for both databases: reading events in order (one account after a
//! sequence, or every account page by page), transactions for projections ([`Tx`]), the
//! per-projection checkpoints ([`checkpoints`]) and consumer offsets ([`offsets`]), the
//! keys' usage ([`usage`]), the
//! account heads and the verification-index snapshots that make a restart quick. The SQL
//! is the same on PostgreSQL and SQLite wherever the dialects agree (`with_pool!` and
//! `with_tx!` run one body on either); where they differ, the code matches on the database
//! at that spot (a projection's batched insert, how a table stores a list).

pub mod checkpoints;
pub mod offsets;
pub mod usage;

use std::collections::HashMap;
use std::path::Path;

use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{AggregateError, EventEnvelope, EventStore};
use keyledger_events::{chain, KeyringEvent};
use postgres_es::PostgresEventRepository;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, Postgres, Row, Sqlite, SqlitePool, Transaction};

use crate::keyring::{Keyring, KeyringError};

/// One stored event with its place in its account's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub account_id: String,
    pub sequence: u64,
    pub event: KeyringEvent,
    /// The event's hash-chain value (hex) as recorded with it, when known.
    pub chain: Option<String>,
    /// Its signature (base64) as recorded with it, when known.
    pub signature: Option<String>,
    /// Who issued the command that caused it.
    pub actor: Option<String>,
    /// That command's id and what the log keeps about it (from the store; not carried on
    /// the topic).
    pub command: Option<(uuid::Uuid, CommandRecord)>,
}

impl StoredRecord {
    /// A record of `event` with nothing recorded beside it.
    pub fn bare(account_id: &str, sequence: u64, event: KeyringEvent) -> Self {
        Self {
            account_id: account_id.to_owned(),
            sequence,
            event,
            chain: None,
            signature: None,
            actor: None,
            command: None,
        }
    }
}

/// What the log keeps about a command beside its events (in their metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandRecord {
    /// BLAKE3 (hex) of the command as received: a reused command id with another command
    /// is refused.
    pub fingerprint: Option<String>,
    /// The new key sealed to the sender's public key (bus), answered again to a redelivery.
    pub sealed_api_key: Option<String>,
}

/// Metadata keys of a commit.
pub mod metadata {
    pub const COMMAND_ID: &str = "command_id";
    pub const ACTOR: &str = "actor";
    /// Before actors were recorded: the sender's own name.
    pub const ISSUED_BY: &str = "issued_by";
    pub const FINGERPRINT: &str = "command_fingerprint";
    pub const SEALED_API_KEY: &str = "sealed_api_key";
}

impl CommandRecord {
    fn of(metadata: &HashMap<String, String>) -> Option<(uuid::Uuid, Self)> {
        let id = metadata.get(metadata::COMMAND_ID)?.parse().ok()?;
        Some((
            id,
            Self {
                fingerprint: metadata.get(metadata::FINGERPRINT).cloned(),
                sealed_api_key: metadata.get(metadata::SEALED_API_KEY).cloned(),
            },
        ))
    }
}

/// A keyring as loaded: ready for a command, with its stream's chain head and what the log
/// keeps about each command it handled.
pub type LoadedKeyring = (
    EventStoreAggregateContext<Keyring>,
    [u8; 32],
    HashMap<uuid::Uuid, CommandRecord>,
);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored event {account_id}#{sequence} cannot be read: {reason}")]
    Corrupt {
        account_id: String,
        sequence: i64,
        reason: String,
    },
    /// A projection has applied up to `checkpoint`; the events handed in start later.
    #[error("projection is behind: checkpoint {checkpoint}")]
    Gap { checkpoint: u64 },
    #[error("{0} needs PostgreSQL")]
    PostgresOnly(&'static str),
}

type AggregateResult<T> = Result<T, AggregateError<KeyringError>>;

pub(crate) enum Backend {
    Postgres {
        pool: PgPool,
        events: PersistedEventStore<PostgresEventRepository, Keyring>,
    },
    Sqlite {
        pool: SqlitePool,
        events: PersistedEventStore<SqliteEventRepository, Keyring>,
        /// A read-only connection of its own for the health checks: the one writing
        /// connection may be busy with a catch-up for a while, which is not a database
        /// that is down.
        probe: SqlitePool,
    },
}

/// The service's database: PostgreSQL in production, a SQLite file when embedded.
pub struct Store {
    pub(crate) backend: Backend,
}

/// How many events a replay reads per query.
pub const REPLAY_PAGE: i64 = 10_000;

/// Runs `$body` with `$pool` bound to the pool of whichever database `$store` is on: one
/// body, compiled once per database, for the SQL both dialects share.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Postgres { pool: $pool, .. } => $body,
            $crate::store::Backend::Sqlite { pool: $pool, .. } => $body,
        }
    };
}

/// Runs `$body` with `$c` bound to the connection of the transaction `$tx`, whichever
/// database it is on.
macro_rules! with_tx {
    ($tx:expr, |$c:ident| $body:expr) => {
        match $tx {
            $crate::store::Tx::Pg(t) => {
                let $c: &mut sqlx::PgConnection = &mut *t;
                $body
            }
            $crate::store::Tx::Lite(t) => {
                let $c: &mut sqlx::SqliteConnection = &mut *t;
                $body
            }
        }
    };
}

pub(crate) use {with_pool, with_tx};

/// A transaction on the service's database.
pub enum Tx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
}

impl Tx {
    pub async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Pg(t) => t.commit().await?,
            Tx::Lite(t) => t.commit().await?,
        }
        Ok(())
    }

    /// The PostgreSQL transaction (the bus's tables live only there).
    pub fn pg(&mut self) -> Option<&mut sqlx::PgConnection> {
        match self {
            Tx::Pg(t) => Some(&mut *t),
            Tx::Lite(_) => None,
        }
    }
}

impl Store {
    /// Connects to PostgreSQL (the pool is built here: postgres-es's helper panics when the
    /// database is down).
    pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        Ok(Self::from_postgres(pool))
    }

    pub fn from_postgres(pool: PgPool) -> Self {
        let events =
            PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()));
        Self {
            backend: Backend::Postgres { pool, events },
        }
    }

    /// Opens (creating if needed) the SQLite file at `path`. One connection: the embedded
    /// mode favours simplicity over write concurrency.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let probe = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        let events = PersistedEventStore::new_event_store(SqliteEventRepository::new(pool.clone()));
        Ok(Self {
            backend: Backend::Sqlite {
                pool,
                events,
                probe,
            },
        })
    }

    /// Creates or upgrades the schema (sqlx migrations checked in under `migrations/`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                sqlx::migrate!("./migrations/postgres").run(pool).await?
            }
            Backend::Sqlite { pool, .. } => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres { .. })
    }

    /// The PostgreSQL pool (the bus runs on PostgreSQL only).
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres { pool, .. } => Some(pool),
            Backend::Sqlite { .. } => None,
        }
    }

    /// Answers when the database does.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Backend::Sqlite { probe, .. } => {
                sqlx::query("SELECT 1").execute(probe).await?;
            }
        }
        Ok(())
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match &self.backend {
            Backend::Postgres { pool, .. } => Tx::Pg(pool.begin().await?),
            Backend::Sqlite { pool, .. } => Tx::Lite(pool.begin().await?),
        })
    }

    /// The keyring of `account_id`, ready for a command, with the chain value of its last
    /// event (as recorded in that event's metadata; recomputed where none was recorded) and
    /// the record of each command it handled.
    pub async fn load_with_chain(&self, account_id: &str) -> AggregateResult<LoadedKeyring> {
        use cqrs_es::Aggregate;
        let envelopes = match &self.backend {
            Backend::Postgres { events, .. } => events.load_events(account_id).await?,
            Backend::Sqlite { events, .. } => events.load_events(account_id).await?,
        };
        let mut context = EventStoreAggregateContext {
            aggregate_id: account_id.to_owned(),
            aggregate: Keyring::default(),
            current_sequence: 0,
            current_snapshot: None,
        };
        let mut head = chain::GENESIS;
        let mut commands = HashMap::new();
        for e in envelopes {
            let sequence = e.sequence as u64;
            head = chain::recorded(&e.metadata, sequence)
                .unwrap_or_else(|| chain::next(&head, account_id, sequence, &e.payload.0));
            commands.extend(CommandRecord::of(&e.metadata));
            context.aggregate.apply(e.payload);
            context.current_sequence = e.sequence;
        }
        Ok((context, head, commands))
    }

    pub async fn commit(
        &self,
        events: Vec<crate::keyring::StoredEvent>,
        context: EventStoreAggregateContext<Keyring>,
        metadata: HashMap<String, String>,
    ) -> AggregateResult<Vec<EventEnvelope<Keyring>>> {
        match &self.backend {
            Backend::Postgres { events: store, .. } => {
                store.commit(events, context, metadata).await
            }
            Backend::Sqlite { events: store, .. } => store.commit(events, context, metadata).await,
        }
    }

    /// The events of `account_id` after `after`, in order.
    pub async fn events_after(
        &self,
        account_id: &str,
        after: u64,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(
                "SELECT aggregate_id, sequence, CAST(payload AS TEXT) AS payload, \
                 CAST(metadata AS TEXT) AS metadata FROM events \
                 WHERE aggregate_type = 'Keyring' AND aggregate_id = $1 AND sequence > $2 \
                 ORDER BY sequence",
            )
            .bind(account_id)
            .bind(after.min(i64::MAX as u64) as i64)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| decode(r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
        })
    }

    /// Every event of one account with who caused it, and nothing else kept beside it
    /// (no chain values, signatures or sealed keys): what a fold for people needs — the
    /// listing at an instant, a key's history — read in a third of the bytes.
    pub async fn life_of(&self, account_id: &str) -> Result<Vec<StoredRecord>, StoreError> {
        with_pool!(self, |pool| {
            sqlx::query(
                "SELECT sequence, CAST(payload AS TEXT) AS payload, \
                 coalesce(metadata->>'actor', metadata->>'issued_by') AS actor FROM events \
                 WHERE aggregate_type = 'Keyring' AND aggregate_id = $1 ORDER BY sequence",
            )
            .bind(account_id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                let sequence: i64 = r.get(0);
                let event = decode_event(account_id, sequence, r.get(1))?;
                Ok(StoredRecord {
                    actor: r.get(2),
                    ..StoredRecord::bare(account_id, sequence.max(0) as u64, event)
                })
            })
            .collect()
        })
    }

    /// One page of every account's events, ordered by (account, sequence), after the
    /// position `after` (exclusive); pass `None` to start.
    pub async fn events_page(
        &self,
        after: Option<(&str, u64)>,
        limit: i64,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let (account, sequence) = after.unwrap_or(("", 0));
        with_pool!(self, |pool| {
            sqlx::query(
                "SELECT aggregate_id, sequence, CAST(payload AS TEXT) AS payload, \
                 CAST(metadata AS TEXT) AS metadata FROM events \
                 WHERE aggregate_type = 'Keyring' AND (aggregate_id, sequence) > ($1, $2) \
                 ORDER BY aggregate_id, sequence LIMIT $3",
            )
            .bind(account)
            .bind(sequence.min(i64::MAX as u64) as i64)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| decode(r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
        })
    }

    /// Every stored event, page by page (each page grouped by account, in order).
    pub fn pages(&self) -> Pages<'_> {
        Pages {
            store: self,
            after: None,
            done: false,
        }
    }

    /// Each account's last sequence (read from the events table's primary key alone).
    pub async fn account_heads(&self) -> Result<Vec<(String, u64)>, StoreError> {
        with_pool!(self, |pool| {
            Ok(sqlx::query_as::<_, (String, i64)>(
                "SELECT aggregate_id, max(sequence) FROM events \
                     WHERE aggregate_type = 'Keyring' GROUP BY aggregate_id",
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(a, s)| (a, s.max(0) as u64))
            .collect())
        })
    }

    /// Keeps `bytes` as the newest snapshot of the verification index, holding the
    /// sequences of `events` events (older snapshots are dropped). On PostgreSQL it goes
    /// over a connection of its own, closed afterwards: a pooled connection would keep a
    /// buffer the size of the snapshot for as long as it lives.
    pub async fn save_index_snapshot(&self, bytes: &[u8], events: u64) -> Result<(), StoreError> {
        let taken_ms = chrono::Utc::now().timestamp_millis();
        let events = events.min(i64::MAX as u64) as i64;
        macro_rules! save {
            ($c:expr) => {{
                let mut tx = sqlx::Acquire::begin($c).await?;
                sqlx::query("DELETE FROM index_snapshots")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO index_snapshots (taken_ms, events, snapshot) VALUES ($1, $2, $3)",
                )
                .bind(taken_ms)
                .bind(events)
                .bind(bytes)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }};
        }
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                let mut c = pool.acquire().await?.detach();
                save!(&mut c);
                let _ = sqlx::Connection::close(c).await;
            }
            Backend::Sqlite { pool, .. } => save!(pool),
        }
        Ok(())
    }

    /// The newest snapshot of the verification index, if any (on PostgreSQL over a
    /// connection of its own, as for saving).
    pub async fn load_index_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = "SELECT snapshot FROM index_snapshots ORDER BY taken_ms DESC LIMIT 1";
        Ok(match &self.backend {
            Backend::Postgres { pool, .. } => {
                let mut c = pool.acquire().await?.detach();
                let bytes = sqlx::query_scalar::<_, Vec<u8>>(sql)
                    .fetch_optional(&mut c)
                    .await?;
                let _ = sqlx::Connection::close(c).await;
                bytes
            }
            Backend::Sqlite { pool, .. } => {
                sqlx::query_scalar::<_, Vec<u8>>(sql)
                    .fetch_optional(pool)
                    .await?
            }
        })
    }

    /// A listener on [`NOTIFY_CHANNEL`] (PostgreSQL only).
    pub async fn listen(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                Ok(Some(listener))
            }
            Backend::Sqlite { .. } => Ok(None),
        }
    }

    /// The chain values the relay recorded for these (account, sequence) pairs (PostgreSQL
    /// with the bus; empty otherwise).
    pub async fn recorded_chains(
        &self,
        keys: &[(String, u64)],
    ) -> Result<HashMap<(String, u64), String>, StoreError> {
        let Some(pool) = self.pg_pool() else {
            return Ok(HashMap::new());
        };
        let accounts: Vec<&str> = keys.iter().map(|(a, _)| a.as_str()).collect();
        let sequences: Vec<i64> = keys.iter().map(|(_, s)| *s as i64).collect();
        Ok(sqlx::query_as::<_, (String, i64, String)>(
            "SELECT c.account_id, c.sequence, c.chain FROM event_chain c \
             JOIN unnest($1::text[], $2::bigint[]) AS k(account_id, sequence) \
             ON c.account_id = k.account_id AND c.sequence = k.sequence",
        )
        .bind(&accounts)
        .bind(&sequences)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(a, s, c)| ((a, s.max(0) as u64), c))
        .collect())
    }
}

/// The whole store, page by page: see [`Store::pages`].
pub struct Pages<'a> {
    store: &'a Store,
    after: Option<(String, u64)>,
    done: bool,
}

impl Pages<'_> {
    /// The next page of records, grouped by account; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<(String, Vec<StoredRecord>)>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .store
            .events_page(
                self.after.as_ref().map(|(a, s)| (a.as_str(), *s)),
                REPLAY_PAGE,
            )
            .await?;
        let Some(last) = page.last() else {
            self.done = true;
            return Ok(None);
        };
        self.after = Some((last.account_id.clone(), last.sequence));
        Ok(Some(group_by_account(page)))
    }
}

/// Records of several accounts (each account's in order, accounts together) as one list
/// per account, first seen first.
pub fn group_by_account(records: Vec<StoredRecord>) -> Vec<(String, Vec<StoredRecord>)> {
    let mut out: Vec<(String, Vec<StoredRecord>)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for record in records {
        match at.get(&record.account_id) {
            Some(&i) => out[i].1.push(record),
            None => {
                at.insert(record.account_id.clone(), out.len());
                out.push((record.account_id.clone(), vec![record]));
            }
        }
    }
    out
}

/// Decodes a stored payload (the cqrs-es form of [`KeyringEvent`]).
/// The event stored as `payload`, or which one is unreadable and why.
fn decode_event(
    account_id: &str,
    sequence: i64,
    payload: &str,
) -> Result<KeyringEvent, StoreError> {
    serde_json::from_str(payload).map_err(|e| StoreError::Corrupt {
        account_id: account_id.to_owned(),
        sequence,
        reason: e.to_string(),
    })
}

fn decode(
    account_id: String,
    sequence: i64,
    payload: String,
    metadata: String,
) -> Result<StoredRecord, StoreError> {
    let event = decode_event(&account_id, sequence, &payload)?;
    let metadata: HashMap<String, String> = serde_json::from_str(&metadata).unwrap_or_default();
    let sequence = sequence.max(0) as u64;
    Ok(StoredRecord {
        account_id,
        sequence,
        chain: chain::recorded(&metadata, sequence).map(|c| chain::to_hex(&c)),
        signature: chain::recorded_signature(&metadata, sequence).map(str::to_owned),
        actor: metadata
            .get(metadata::ACTOR)
            .or_else(|| metadata.get(metadata::ISSUED_BY))
            .cloned(),
        command: CommandRecord::of(&metadata),
        event,
    })
}

/// The PostgreSQL channel on which every commit names its account.
pub const NOTIFY_CHANNEL: &str = "keyledger_events";
