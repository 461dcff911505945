//! The usage tables: when each key was last verified (`key_usage`) and how often, per UTC
//! day (`key_usage_days`). The verify path counts in memory; each instance adds what it
//! counted every few seconds ([`record`]), so the rows are the sum over instances. These
//! are not events: the log records a key's life, not its traffic.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{with_pool, Backend, Store, StoreError};

/// One key's verifications to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub key_id: Uuid,
    pub account_id: String,
    pub verifications: i64,
    /// Unix seconds of the last verification.
    pub last_used_s: i64,
}

/// A key's usage as the listing shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUsage {
    pub last_used_at: Option<DateTime<Utc>>,
    /// Verifications on the last 30 UTC days (today included).
    pub verifications_30d: i64,
}

/// Days kept in `key_usage_days` (the listing sums 30; a margin for the day boundary).
pub const DAYS_KEPT: i64 = 32;

/// The UTC day of `t`, in days since 1970-01-01.
pub fn day_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(86_400)
}

fn at(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(seconds, 0)
}

/// Adds `counted` (one entry per key) to the tables as verifications of day `day`, in one
/// transaction: all or nothing, so a failed flush can be retried without counting twice.
pub async fn record(store: &Store, counted: &[&Counted], day: i64) -> Result<(), StoreError> {
    if counted.is_empty() {
        return Ok(());
    }
    match &store.backend {
        Backend::Postgres { pool, .. } => {
            let ids: Vec<String> = counted.iter().map(|c| c.key_id.to_string()).collect();
            let accounts: Vec<&str> = counted.iter().map(|c| c.account_id.as_str()).collect();
            let last: Vec<i64> = counted.iter().map(|c| c.last_used_s).collect();
            let uses: Vec<i64> = counted.iter().map(|c| c.verifications).collect();
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO key_usage (key_id, account_id, last_used_s) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) \
                 ON CONFLICT (key_id) DO UPDATE \
                 SET last_used_s = GREATEST(key_usage.last_used_s, EXCLUDED.last_used_s)",
            )
            .bind(&ids)
            .bind(&accounts)
            .bind(&last)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO key_usage_days (key_id, day, verifications) \
                 SELECT k, $2, n FROM UNNEST($1::text[], $3::bigint[]) AS t(k, n) \
                 ON CONFLICT (key_id, day) DO UPDATE \
                 SET verifications = key_usage_days.verifications + EXCLUDED.verifications",
            )
            .bind(&ids)
            .bind(day)
            .bind(&uses)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Backend::Sqlite { pool, .. } => {
            let mut tx = pool.begin().await?;
            for c in counted {
                sqlx::query(
                    "INSERT INTO key_usage (key_id, account_id, last_used_s) VALUES ($1, $2, $3) \
                     ON CONFLICT (key_id) DO UPDATE \
                     SET last_used_s = MAX(key_usage.last_used_s, excluded.last_used_s)",
                )
                .bind(c.key_id.to_string())
                .bind(&c.account_id)
                .bind(c.last_used_s)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO key_usage_days (key_id, day, verifications) VALUES ($1, $2, $3) \
                     ON CONFLICT (key_id, day) DO UPDATE \
                     SET verifications = key_usage_days.verifications + excluded.verifications",
                )
                .bind(c.key_id.to_string())
                .bind(day)
                .bind(c.verifications)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Forgets the daily counts before `day` (the last-used time stays).
pub async fn prune(store: &Store, day: i64) -> Result<u64, StoreError> {
    let done = with_pool!(store, |pool| {
        sqlx::query("DELETE FROM key_usage_days WHERE day < $1")
            .bind(day)
            .execute(pool)
            .await?
            .rows_affected()
    });
    Ok(done)
}

/// The usage of every key of `account_id` that was ever verified, as of day `today`.
pub async fn of_account(
    store: &Store,
    account_id: &str,
    today: i64,
) -> Result<HashMap<Uuid, KeyUsage>, StoreError> {
    let rows: Vec<(String, i64, i64)> = with_pool!(store, |pool| {
        sqlx::query_as(
            "SELECT u.key_id, u.last_used_s, CAST(COALESCE((SELECT SUM(d.verifications) \
             FROM key_usage_days d WHERE d.key_id = u.key_id AND d.day > $2), 0) AS BIGINT) \
             FROM key_usage u WHERE u.account_id = $1",
        )
        .bind(account_id)
        .bind(today - 30)
        .fetch_all(pool)
        .await?
    });
    Ok(rows
        .into_iter()
        .filter_map(|(id, last, n)| {
            Some((
                Uuid::parse_str(&id).ok()?,
                KeyUsage {
                    last_used_at: at(last),
                    verifications_30d: n,
                },
            ))
        })
        .collect())
}

/// When `key_id` was last verified (None: never, as far as the table knows).
pub async fn last_used(store: &Store, key_id: Uuid) -> Result<Option<DateTime<Utc>>, StoreError> {
    let row: Option<(i64,)> = with_pool!(store, |pool| {
        sqlx::query_as("SELECT last_used_s FROM key_usage WHERE key_id = $1")
            .bind(key_id.to_string())
            .fetch_optional(pool)
            .await?
    });
    Ok(row.and_then(|(s,)| at(s)))
}

/// Since when usage is recorded (the upgrade that created the tables).
pub async fn tracked_since(store: &Store) -> Result<Option<DateTime<Utc>>, StoreError> {
    let row: (Option<i64>,) = with_pool!(store, |pool| {
        sqlx::query_as("SELECT MIN(started_s) FROM usage_tracking")
            .fetch_one(pool)
            .await?
    });
    Ok(row.0.and_then(at))
}
