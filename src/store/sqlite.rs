//! The hand-written queries on SQLite (the embedded store).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use keyledger_projections::{listing_change, KeyStatus, ListingChange, ListingRow};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

use super::{decode, unapplied, StoreError, StoredRecord, LISTING};

pub(super) async fn events_after(
    pool: &SqlitePool,
    account_id: &str,
    after: u64,
) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT sequence, payload, metadata FROM events \
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
    pool: &SqlitePool,
    account: &str,
    sequence: u64,
    limit: i64,
) -> Result<Vec<StoredRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, payload, metadata FROM events \
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
    pool: &SqlitePool,
    account_id: &str,
    records: &[StoredRecord],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, account_id, sequence) VALUES ($1, $2, 0) \
         ON CONFLICT (projection, account_id) DO NOTHING",
    )
    .bind(LISTING)
    .bind(account_id)
    .execute(&mut *tx)
    .await?;
    // The pool has one connection, so this transaction is the only writer.
    let checkpoint: i64 = sqlx::query_scalar(
        "SELECT sequence FROM projection_checkpoints WHERE projection = $1 AND account_id = $2",
    )
    .bind(LISTING)
    .bind(account_id)
    .fetch_one(&mut *tx)
    .await?;
    let todo = unapplied(records, checkpoint.max(0) as u64)?;
    let Some(last) = todo.last() else {
        return Ok(());
    };
    for record in todo {
        match listing_change(account_id, &record.event) {
            ListingChange::Insert(row) => {
                sqlx::query(
                    "INSERT INTO key_listing (account_id, key_id, label, last_five, contacts, created_at, expires_at, status) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (account_id, key_id) DO NOTHING",
                )
                .bind(&row.account_id)
                .bind(row.key_id.to_string())
                .bind(&row.label)
                .bind(&row.last_five)
                .bind(json_list(&row.contacts))
                .bind(row.created_at)
                .bind(row.expires_at)
                .bind(row.status.as_str())
                .execute(&mut *tx)
                .await?;
            }
            ListingChange::SetContacts { key_id, contacts } => {
                sqlx::query(
                    "UPDATE key_listing SET contacts = $3 WHERE account_id = $1 AND key_id = $2",
                )
                .bind(account_id)
                .bind(key_id.to_string())
                .bind(json_list(&contacts))
                .execute(&mut *tx)
                .await?;
            }
            ListingChange::SetExpiry { key_id, expires_at } => {
                sqlx::query(
                    "UPDATE key_listing SET expires_at = $3 WHERE account_id = $1 AND key_id = $2",
                )
                .bind(account_id)
                .bind(key_id.to_string())
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
            }
            ListingChange::MarkExpired { key_id } => {
                sqlx::query("UPDATE key_listing SET status = 'expired' WHERE account_id = $1 AND key_id = $2")
                    .bind(account_id)
                    .bind(key_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            ListingChange::Remove { key_id } => {
                sqlx::query("DELETE FROM key_listing WHERE account_id = $1 AND key_id = $2")
                    .bind(account_id)
                    .bind(key_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            ListingChange::Nothing => {}
        }
    }
    sqlx::query(
        "UPDATE projection_checkpoints SET sequence = $3 WHERE projection = $1 AND account_id = $2",
    )
    .bind(LISTING)
    .bind(account_id)
    .bind(last.sequence as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn listing_checkpoints(
    pool: &SqlitePool,
) -> Result<HashMap<String, u64>, StoreError> {
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
    pool: &SqlitePool,
    account_id: Option<&str>,
) -> Result<Vec<ListingRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT account_id, key_id, label, last_five, contacts, created_at, expires_at, status FROM key_listing \
         WHERE ($1 IS NULL OR account_id = $1) ORDER BY account_id, created_at, key_id",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ListingRow {
                account_id: r.try_get("account_id")?,
                key_id: parse_uuid(r.try_get("key_id")?)?,
                label: r.try_get("label")?,
                last_five: r.try_get("last_five")?,
                contacts: serde_json::from_str(r.try_get("contacts")?)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                created_at: r.try_get::<DateTime<Utc>, _>("created_at")?,
                expires_at: r.try_get::<DateTime<Utc>, _>("expires_at")?,
                status: KeyStatus::parse(r.try_get("status")?).unwrap_or(KeyStatus::Active),
            })
        })
        .collect()
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

fn parse_uuid(s: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
