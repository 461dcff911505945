//! Persistence: the event store (postgres-es or sqlite-es) and the listing table.
//!
//! cqrs-es gives us loading, committing and optimistic concurrency; what it does not give
//! (reading events in order for replays and catch-up, the listing table with its
//! checkpoint) is written here by hand, once per database, behind one [`Store`] type so the
//! rest of the service does not care which database it runs on.

pub mod offsets;
mod postgres;
pub mod reactions;
mod sqlite;

use std::collections::HashMap;
use std::path::Path;

use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventStore};
use cqrs_es::{AggregateError, EventEnvelope, EventStore};
use keyledger_events::KeyringEvent;
use keyledger_projections::ListingRow;
use postgres_es::PostgresEventRepository;
use sqlite_es::SqliteEventRepository;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};

use keyledger_events::chain;
use crate::keyring::{Keyring, KeyringError};

/// One stored event with its place in its account's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub account_id: String,
    pub sequence: u64,
    pub event: KeyringEvent,
    /// The event's hash-chain value (hex) as recorded with it, when known.
    pub chain: Option<String>,
}

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
    /// The listing has applied up to `checkpoint`; the events handed in start later.
    #[error("listing is behind: checkpoint {checkpoint}")]
    Gap { checkpoint: u64 },
}

type AggregateResult<T> = Result<T, AggregateError<KeyringError>>;

enum Backend {
    Postgres {
        pool: PgPool,
        events: PersistedEventStore<PostgresEventRepository, Keyring>,
    },
    Sqlite {
        pool: SqlitePool,
        events: PersistedEventStore<SqliteEventRepository, Keyring>,
    },
}

/// The service's database: PostgreSQL in production, a SQLite file when embedded.
pub struct Store {
    backend: Backend,
}

/// How many events a replay reads per query.
pub const REPLAY_PAGE: i64 = 5_000;

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
            .connect_with(options)
            .await?;
        let events = PersistedEventStore::new_event_store(SqliteEventRepository::new(pool.clone()));
        Ok(Self {
            backend: Backend::Sqlite { pool, events },
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

    /// Answers when the database does.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => sqlx::query("SELECT 1").execute(pool).await?,
            Backend::Sqlite { pool, .. } => {
                sqlx::query("SELECT 1").execute(pool).await?;
                return Ok(());
            }
        };
        Ok(())
    }

    /// The keyring of `account_id`, ready for a command, with the chain value of its last
    /// event (as recorded in that event's metadata; recomputed where none was recorded).
    pub async fn load_with_chain(
        &self,
        account_id: &str,
    ) -> AggregateResult<(EventStoreAggregateContext<Keyring>, [u8; 32])> {
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
        for e in envelopes {
            let sequence = e.sequence as u64;
            head = chain::recorded(&e.metadata, sequence)
                .unwrap_or_else(|| chain::next(&head, account_id, sequence, &e.payload.0));
            context.aggregate.apply(e.payload);
            context.current_sequence = e.sequence;
        }
        Ok((context, head))
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
        match &self.backend {
            Backend::Postgres { pool, .. } => postgres::events_after(pool, account_id, after).await,
            Backend::Sqlite { pool, .. } => sqlite::events_after(pool, account_id, after).await,
        }
    }

    /// One page of every account's events, ordered by (account, sequence), after the
    /// position `after` (exclusive); pass `None` to start.
    pub async fn events_page(
        &self,
        after: Option<(&str, u64)>,
        limit: i64,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let (account, sequence) = after.unwrap_or(("", 0));
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                postgres::events_page(pool, account, sequence, limit).await
            }
            Backend::Sqlite { pool, .. } => {
                sqlite::events_page(pool, account, sequence, limit).await
            }
        }
    }

    /// Applies `records` (all of one account, in order) to the listing table and moves its
    /// checkpoint, in one transaction. Records at or below the checkpoint are skipped; a
    /// gap before the first new record is reported as [`StoreError::Gap`].
    pub async fn apply_to_listing(
        &self,
        account_id: &str,
        records: &[StoredRecord],
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => {
                postgres::apply_to_listing(pool, account_id, records).await
            }
            Backend::Sqlite { pool, .. } => {
                sqlite::apply_to_listing(pool, account_id, records).await
            }
        }
    }

    /// The listing checkpoints of every account.
    pub async fn listing_checkpoints(&self) -> Result<HashMap<String, u64>, StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => postgres::listing_checkpoints(pool).await,
            Backend::Sqlite { pool, .. } => sqlite::listing_checkpoints(pool).await,
        }
    }

    /// The listing rows of one account, oldest first.
    pub async fn listing_of(&self, account_id: &str) -> Result<Vec<ListingRow>, StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => postgres::listing_of(pool, Some(account_id)).await,
            Backend::Sqlite { pool, .. } => sqlite::listing_of(pool, Some(account_id)).await,
        }
    }
}

/// Decodes a stored payload (the cqrs-es form of [`KeyringEvent`]).
fn decode(
    account_id: &str,
    sequence: i64,
    payload: &str,
    metadata: &str,
) -> Result<StoredRecord, StoreError> {
    let event: KeyringEvent = serde_json::from_str(payload).map_err(|e| StoreError::Corrupt {
        account_id: account_id.to_owned(),
        sequence,
        reason: e.to_string(),
    })?;
    let metadata: HashMap<String, String> = serde_json::from_str(metadata).unwrap_or_default();
    let sequence = sequence.max(0) as u64;
    Ok(StoredRecord {
        account_id: account_id.to_owned(),
        sequence,
        event,
        chain: chain::recorded(&metadata, sequence).map(|c| chain::to_hex(&c)),
    })
}

/// The records of `records` after `checkpoint`, or a gap error.
fn unapplied(records: &[StoredRecord], checkpoint: u64) -> Result<&[StoredRecord], StoreError> {
    let start = records.partition_point(|r| r.sequence <= checkpoint);
    let rest = &records[start..];
    match rest.first() {
        Some(first) if first.sequence != checkpoint + 1 => Err(StoreError::Gap { checkpoint }),
        _ => Ok(rest),
    }
}

const LISTING: &str = "listing";

/// The PostgreSQL channel on which every commit names its account.
pub const NOTIFY_CHANNEL: &str = "keyledger_events";

impl Store {
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
}

pub use postgres::{IndexRow, IndexSnapshot};

impl Store {
    /// Every listing row, ordered by account, creation time, key id.
    pub async fn listing_all(&self) -> Result<Vec<ListingRow>, StoreError> {
        match &self.backend {
            Backend::Postgres { pool, .. } => postgres::listing_of(pool, None).await,
            Backend::Sqlite { pool, .. } => sqlite::listing_of(pool, None).await,
        }
    }

    /// The chain values the relay recorded for these (account, sequence) pairs (PostgreSQL
    /// with the bus; empty otherwise).
    pub async fn recorded_chains(
        &self,
        keys: &[(String, u64)],
    ) -> Result<HashMap<(String, u64), String>, StoreError> {
        let Backend::Postgres { pool, .. } = &self.backend else {
            return Ok(HashMap::new());
        };
        postgres::recorded_chains(pool, keys).await
    }

    /// The PostgreSQL pool (the bus runs on PostgreSQL only).
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres { pool, .. } => Some(pool),
            Backend::Sqlite { .. } => None,
        }
    }
}

/// Applies events consumed from a topic to the listing and the persisted index, and
/// records the consumer's next offsets — all in one transaction. Records of each account
/// must be in order; a gap is filled from the event store.
pub async fn project_batch(
    store: &Store,
    consumer: &str,
    topic: &str,
    by_account: &[(String, Vec<StoredRecord>)],
    next_offsets: &[(i32, i64)],
) -> Result<(), StoreError> {
    let pool = store.pg_pool().ok_or_else(|| StoreError::Corrupt {
        account_id: String::new(),
        sequence: 0,
        reason: "the projector needs PostgreSQL".into(),
    })?;
    let mut tx = pool.begin().await?;
    for (account, records) in by_account {
        for apply in [0, 1] {
            let result = if apply == 0 {
                postgres::apply_to_listing_tx(&mut tx, account, records).await
            } else {
                postgres::apply_to_index_tx(&mut tx, account, records).await
            };
            if let Err(StoreError::Gap { checkpoint }) = result {
                let missing = store.events_after(account, checkpoint).await?;
                if apply == 0 {
                    postgres::apply_to_listing_tx(&mut tx, account, &missing).await?;
                } else {
                    postgres::apply_to_index_tx(&mut tx, account, &missing).await?;
                }
            } else {
                result?;
            }
        }
    }
    for (partition, next) in next_offsets {
        offsets::save(&mut *tx, consumer, topic, *partition, *next).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The persisted index with the projector's offsets, in one snapshot.
pub async fn index_snapshot(
    store: &Store,
    consumer: &str,
    topic: &str,
) -> Result<IndexSnapshot, StoreError> {
    match store.pg_pool() {
        Some(pool) => postgres::index_snapshot(pool, consumer, topic).await,
        None => Ok(IndexSnapshot {
            accounts: vec![],
            rows: vec![],
            offsets: vec![],
        }),
    }
}
