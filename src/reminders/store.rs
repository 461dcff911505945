//! The saga's table, `reminder_schedule`: one row per key with a reminder or its expiry
//! ahead (the schedule as JSON, `next_due_ms` indexed for "what is due now"). The SQL is
//! the same on PostgreSQL and SQLite; times are Unix milliseconds.

use uuid::Uuid;

use super::schedule::KeySchedule;
use crate::store::{with_pool, with_tx, Store, StoreError, Tx};

fn schedule_of(json: &str) -> Result<KeySchedule, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        account_id: String::new(),
        sequence: 0,
        reason: format!("reminder schedule: {e}"),
    })
}

/// The schedule of `key_id`, if it has one.
pub async fn get(tx: &mut Tx, key_id: Uuid) -> Result<Option<KeySchedule>, StoreError> {
    let json: Option<String> = with_tx!(tx, |c| {
        sqlx::query_scalar("SELECT schedule FROM reminder_schedule WHERE key_id = $1")
            .bind(key_id.to_string())
            .fetch_optional(c)
            .await?
    });
    json.as_deref().map(schedule_of).transpose()
}

/// Writes a key's schedule.
pub async fn put(tx: &mut Tx, s: &KeySchedule) -> Result<(), StoreError> {
    let json = serde_json::to_string(s).map_err(|e| StoreError::Corrupt {
        account_id: s.account_id.clone(),
        sequence: 0,
        reason: e.to_string(),
    })?;
    with_tx!(tx, |c| {
        sqlx::query(
            "INSERT INTO reminder_schedule (key_id, account_id, next_due_ms, schedule) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO UPDATE \
             SET next_due_ms = excluded.next_due_ms, schedule = excluded.schedule",
        )
        .bind(s.key_id.to_string())
        .bind(&s.account_id)
        .bind(s.next_due().timestamp_millis())
        .bind(&json)
        .execute(c)
        .await?;
    });
    Ok(())
}

/// Deletes a key's schedule (revoked, expired).
pub async fn remove(tx: &mut Tx, key_id: Uuid) -> Result<(), StoreError> {
    with_tx!(tx, |c| {
        sqlx::query("DELETE FROM reminder_schedule WHERE key_id = $1")
            .bind(key_id.to_string())
            .execute(c)
            .await?;
    });
    Ok(())
}

/// Schedules whose next stage falls due at or before `until_ms`, soonest first,
/// optionally of one account.
pub async fn due(
    store: &Store,
    until_ms: i64,
    account: Option<&str>,
    limit: i64,
) -> Result<Vec<KeySchedule>, StoreError> {
    let rows: Vec<String> = with_pool!(store, |pool| {
        sqlx::query_scalar(
            "SELECT schedule FROM reminder_schedule WHERE next_due_ms <= $1 \
             AND ($2 IS NULL OR account_id = $2) ORDER BY next_due_ms LIMIT $3",
        )
        .bind(until_ms)
        .bind(account)
        .bind(limit)
        .fetch_all(pool)
        .await?
    });
    rows.iter().map(|r| schedule_of(r)).collect()
}

/// How many keys have something due at or before `until_ms`.
pub async fn count_due(store: &Store, until_ms: i64) -> Result<i64, StoreError> {
    Ok(with_pool!(store, |pool| {
        sqlx::query_scalar("SELECT count(*) FROM reminder_schedule WHERE next_due_ms <= $1")
            .bind(until_ms)
            .fetch_one(pool)
            .await?
    }))
}
