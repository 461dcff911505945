//! The hand-written queries on PostgreSQL.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use keyledger_projections::{listing_change, KeyStatus, ListingChange, ListingRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{decode, unapplied, StoreError, StoredRecord, LISTING};

pub(super) async fn events_after(
    pool: &PgPool,
    account_id: &str,
    after: u64,
) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT sequence, payload::text AS payload, metadata::text AS metadata FROM events \
         WHERE aggregate_type = 'Keyring' AND aggregate_id = $1 AND sequence > $2 ORDER BY sequence",
    )
    .bind(account_id)
    .bind(after.min(i64::MAX as u64) as i64)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            decode(
                account_id,
                r.get::<i64, _>("sequence"),
                r.get("payload"),
                r.get("metadata"),
            )
        })
        .collect()
}

pub(super) async fn events_page(
    pool: &PgPool,
    account: &str,
    sequence: u64,
    limit: i64,
) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, payload::text AS payload, metadata::text AS metadata FROM events \
         WHERE aggregate_type = 'Keyring' AND (aggregate_id, sequence) > ($1, $2) \
         ORDER BY aggregate_id, sequence LIMIT $3",
    )
    .bind(account)
    .bind(sequence.min(i64::MAX as u64) as i64)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            decode(
                r.get("aggregate_id"),
                r.get::<i64, _>("sequence"),
                r.get("payload"),
                r.get("metadata"),
            )
        })
        .collect()
}

pub(super) async fn apply_to_listing(
    pool: &PgPool,
    account_id: &str,
    records: &[StoredRecord],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    apply_to_listing_tx(&mut tx, account_id, records).await?;
    tx.commit().await?;
    Ok(())
}

/// Locks the checkpoint of (`projection`, `account_id`), moves it past `records` and
/// returns those not applied yet; a gap before them is [`StoreError::Gap`].
async fn checkpointed<'r>(
    tx: &mut Transaction<'_, Postgres>,
    projection: &str,
    account_id: &str,
    records: &'r [StoredRecord],
) -> Result<&'r [StoredRecord], StoreError> {
    // Serialise on the checkpoint row (for a new account, on its insertion).
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, account_id, sequence) VALUES ($1, $2, 0) \
         ON CONFLICT (projection, account_id) DO NOTHING",
    )
    .bind(projection)
    .bind(account_id)
    .execute(&mut **tx)
    .await?;
    let checkpoint: i64 = sqlx::query_scalar(
        "SELECT sequence FROM projection_checkpoints WHERE projection = $1 AND account_id = $2 FOR UPDATE",
    )
    .bind(projection)
    .bind(account_id)
    .fetch_one(&mut **tx)
    .await?;
    let todo = unapplied(records, checkpoint.max(0) as u64)?;
    if let Some(last) = todo.last() {
        sqlx::query("UPDATE projection_checkpoints SET sequence = $3 WHERE projection = $1 AND account_id = $2")
            .bind(projection)
            .bind(account_id)
            .bind(last.sequence as i64)
            .execute(&mut **tx)
            .await?;
    }
    Ok(todo)
}

/// Applies `records` of one account to the listing table inside `tx`.
pub(crate) async fn apply_to_listing_tx(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    records: &[StoredRecord],
) -> Result<(), StoreError> {
    let todo = checkpointed(tx, LISTING, account_id, records).await?;
    for record in todo {
        match listing_change(account_id, &record.event) {
            ListingChange::Insert(row) => {
                sqlx::query(
                    "INSERT INTO key_listing (account_id, key_id, label, last_five, contacts, created_at, expires_at, status) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (account_id, key_id) DO NOTHING",
                )
                .bind(&row.account_id)
                .bind(row.key_id)
                .bind(&row.label)
                .bind(&row.last_five)
                .bind(&row.contacts)
                .bind(row.created_at)
                .bind(row.expires_at)
                .bind(row.status.as_str())
                .execute(&mut **tx)
                .await?;
            }
            ListingChange::SetContacts { key_id, contacts } => {
                sqlx::query(
                    "UPDATE key_listing SET contacts = $3 WHERE account_id = $1 AND key_id = $2",
                )
                .bind(account_id)
                .bind(key_id)
                .bind(&contacts)
                .execute(&mut **tx)
                .await?;
            }
            ListingChange::SetExpiry { key_id, expires_at } => {
                sqlx::query(
                    "UPDATE key_listing SET expires_at = $3 WHERE account_id = $1 AND key_id = $2",
                )
                .bind(account_id)
                .bind(key_id)
                .bind(expires_at)
                .execute(&mut **tx)
                .await?;
            }
            ListingChange::MarkExpired { key_id } => {
                sqlx::query("UPDATE key_listing SET status = 'expired' WHERE account_id = $1 AND key_id = $2")
                    .bind(account_id)
                    .bind(key_id)
                    .execute(&mut **tx)
                    .await?;
            }
            ListingChange::Remove { key_id } => {
                sqlx::query("DELETE FROM key_listing WHERE account_id = $1 AND key_id = $2")
                    .bind(account_id)
                    .bind(key_id)
                    .execute(&mut **tx)
                    .await?;
            }
            ListingChange::Nothing => {}
        }
    }
    Ok(())
}

pub(super) async fn listing_checkpoints(pool: &PgPool) -> Result<HashMap<String, u64>, StoreError> {
    let rows = sqlx::query(
        "SELECT account_id, sequence FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(LISTING)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("account_id"),
                r.get::<i64, _>("sequence").max(0) as u64,
            )
        })
        .collect())
}

pub(super) async fn listing_of(
    pool: &PgPool,
    account_id: Option<&str>,
) -> Result<Vec<ListingRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT account_id, key_id, label, last_five, contacts, created_at, expires_at, status FROM key_listing \
         WHERE ($1::text IS NULL OR account_id = $1) ORDER BY account_id, created_at, key_id",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ListingRow {
                account_id: r.try_get("account_id")?,
                key_id: r.try_get("key_id")?,
                label: r.try_get("label")?,
                last_five: r.try_get("last_five")?,
                contacts: r.try_get("contacts")?,
                created_at: r.try_get::<DateTime<Utc>, _>("created_at")?,
                expires_at: r.try_get::<DateTime<Utc>, _>("expires_at")?,
                status: KeyStatus::parse(r.try_get("status")?).unwrap_or(KeyStatus::Active),
            })
        })
        .collect()
}

const INDEX: &str = "index";

/// Applies `records` of one account to the persisted verification index inside `tx`.
pub(crate) async fn apply_to_index_tx(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    records: &[StoredRecord],
) -> Result<(), StoreError> {
    use keyledger_events::KeyringEvent as E;
    let todo = checkpointed(tx, INDEX, account_id, records).await?;
    for record in todo {
        let (login, key_id, key_hash, legacy_hash, label, expires_at) = match &record.event {
            E::KeyGenerated(e) => (
                &e.login_email,
                e.key_id,
                Some(&e.key_hash),
                None,
                &e.label,
                e.expires_at,
            ),
            E::LegacyKeyMigrated(e) => (
                &e.login_email,
                e.key_id,
                None,
                Some(&e.legacy_hash),
                &e.label,
                e.expires_at,
            ),
            E::KeyRevoked(e) => {
                set_status(tx, account_id, e.key_id, "revoked", false).await?;
                continue;
            }
            E::KeyExpired(e) => {
                set_status(tx, account_id, e.key_id, "expired", true).await?;
                continue;
            }
            E::KeyRotated(e) => {
                sqlx::query(
                    "UPDATE verification_index SET expires_at = LEAST(expires_at, $3) WHERE account_id = $1 AND key_id = $2",
                )
                .bind(account_id)
                .bind(e.old_key_id)
                .bind(e.old_key_expires_at)
                .execute(&mut **tx)
                .await?;
                continue;
            }
            E::ContactsUpdated(_) | E::ExpiryReminderDue(_) => continue,
        };
        sqlx::query("INSERT INTO index_accounts (account_id, login_email) VALUES ($1, $2) ON CONFLICT (account_id) DO NOTHING")
            .bind(account_id)
            .bind(login)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO verification_index (account_id, key_id, key_hash, legacy_hash, label, expires_at, status) \
             VALUES ($1, $2, $3, $4, $5, $6, 'active') ON CONFLICT (account_id, key_id) DO NOTHING",
        )
        .bind(account_id)
        .bind(key_id)
        .bind(key_hash)
        .bind(legacy_hash)
        .bind(label)
        .bind(expires_at)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn set_status(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    key_id: Uuid,
    status: &str,
    only_if_active: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE verification_index SET status = $3 WHERE account_id = $1 AND key_id = $2 AND (NOT $4 OR status = 'active')",
    )
    .bind(account_id)
    .bind(key_id)
    .bind(status)
    .bind(only_if_active)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One persisted index row.
pub struct IndexRow {
    pub account_id: String,
    pub key_id: Uuid,
    pub key_hash: Option<String>,
    pub legacy_hash: Option<String>,
    pub label: String,
    pub expires_at: DateTime<Utc>,
    pub status: String,
}

/// The persisted index and the offsets it reflects, read in one consistent snapshot.
pub struct IndexSnapshot {
    /// (account, login email, applied sequence)
    pub accounts: Vec<(String, String, u64)>,
    pub rows: Vec<IndexRow>,
    /// (partition, next offset) of the projector on the events topic.
    pub offsets: Vec<(i32, i64)>,
}

pub(crate) async fn index_snapshot(
    pool: &PgPool,
    consumer: &str,
    topic: &str,
) -> Result<IndexSnapshot, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let accounts = sqlx::query(
        "SELECT a.account_id, a.login_email, COALESCE(c.sequence, 0) AS sequence FROM index_accounts a \
         LEFT JOIN projection_checkpoints c ON c.projection = 'index' AND c.account_id = a.account_id",
    )
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| (r.get("account_id"), r.get("login_email"), r.get::<i64, _>("sequence").max(0) as u64))
    .collect();
    let rows = sqlx::query("SELECT account_id, key_id, key_hash, legacy_hash, label, expires_at, status FROM verification_index")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| IndexRow {
            account_id: r.get("account_id"),
            key_id: r.get("key_id"),
            key_hash: r.get("key_hash"),
            legacy_hash: r.get("legacy_hash"),
            label: r.get("label"),
            expires_at: r.get("expires_at"),
            status: r.get("status"),
        })
        .collect();
    let offsets = sqlx::query(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer = $1 AND topic = $2",
    )
    .bind(consumer)
    .bind(topic)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| (r.get::<i32, _>("partition"), r.get::<i64, _>("next_offset")))
    .collect();
    tx.commit().await?;
    Ok(IndexSnapshot {
        accounts,
        rows,
        offsets,
    })
}

/// The chain values the relay recorded for these (account, sequence) pairs.
pub(super) async fn recorded_chains(
    pool: &PgPool,
    keys: &[(String, u64)],
) -> Result<HashMap<(String, u64), String>, StoreError> {
    let accounts: Vec<&str> = keys.iter().map(|(a, _)| a.as_str()).collect();
    let sequences: Vec<i64> = keys.iter().map(|(_, s)| *s as i64).collect();
    let rows = sqlx::query(
        "SELECT c.account_id, c.sequence, c.chain FROM event_chain c \
         JOIN unnest($1::text[], $2::bigint[]) AS k(account_id, sequence) \
         ON c.account_id = k.account_id AND c.sequence = k.sequence",
    )
    .bind(&accounts)
    .bind(&sequences)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                (
                    r.get::<String, _>("account_id"),
                    r.get::<i64, _>("sequence").max(0) as u64,
                ),
                r.get("chain"),
            )
        })
        .collect())
}
