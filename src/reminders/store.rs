//! The saga's table, `reminder_schedule`: one row per key with a reminder or its expiry
//! ahead (the schedule as JSON, `next_due_ms` indexed for "what is due now"). The SQL is
//! the same on PostgreSQL and SQLite; times are Unix milliseconds.

use std::collections::HashMap;

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

/// The schedules of `key_ids` that exist (one query, however many keys).
pub async fn get_many(
    tx: &mut Tx,
    key_ids: &[Uuid],
) -> Result<HashMap<Uuid, KeySchedule>, StoreError> {
    let mut found = HashMap::new();
    for chunk in key_ids.chunks(500) {
        let rows: Vec<String> = with_tx!(tx, |c| {
            let mut q =
                sqlx::QueryBuilder::new("SELECT schedule FROM reminder_schedule WHERE key_id IN (");
            let mut list = q.separated(", ");
            for k in chunk {
                list.push_bind(k.to_string());
            }
            q.push(")");
            q.build_query_scalar().fetch_all(c).await?
        });
        for json in rows {
            let s = schedule_of(&json)?;
            found.insert(s.key_id, s);
        }
    }
    Ok(found)
}

/// Writes these schedules (one statement per few hundred).
pub async fn put_many(tx: &mut Tx, schedules: &[&KeySchedule]) -> Result<(), StoreError> {
    let mut rows = Vec::with_capacity(schedules.len());
    for s in schedules {
        let json = serde_json::to_string(s).map_err(|e| StoreError::Corrupt {
            account_id: s.account_id.clone(),
            sequence: 0,
            reason: e.to_string(),
        })?;
        rows.push((
            s.key_id.to_string(),
            s.account_id.clone(),
            s.next_due().timestamp_millis(),
            json,
        ));
    }
    for chunk in rows.chunks(500) {
        with_tx!(tx, |c| {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO reminder_schedule (key_id, account_id, next_due_ms, schedule) ",
            );
            q.push_values(chunk, |mut b, (key, account, due, json)| {
                b.push_bind(key.clone())
                    .push_bind(account.clone())
                    .push_bind(*due)
                    .push_bind(json.clone());
            });
            q.push(
                " ON CONFLICT (key_id) DO UPDATE \
                 SET next_due_ms = excluded.next_due_ms, schedule = excluded.schedule",
            );
            q.build().execute(c).await?;
        });
    }
    Ok(())
}

/// Deletes these keys' schedules (revoked, expired).
pub async fn remove_many(tx: &mut Tx, key_ids: &[Uuid]) -> Result<(), StoreError> {
    for chunk in key_ids.chunks(500) {
        with_tx!(tx, |c| {
            let mut q = sqlx::QueryBuilder::new("DELETE FROM reminder_schedule WHERE key_id IN (");
            let mut list = q.separated(", ");
            for k in chunk {
                list.push_bind(k.to_string());
            }
            q.push(")");
            q.build().execute(c).await?;
        });
    }
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
