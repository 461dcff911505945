//! Per-projection, per-account checkpoints: the last sequence a projection applied to an
//! account. Moved in the same transaction as the projection's effect, they make applying an
//! event twice harmless (a redelivery, a replay) and reveal a gap (events a projection has
//! not seen). Table `projection_checkpoints`.

use std::collections::HashMap;

use sqlx::Row;

use super::{with_pool, Store, StoreError, Tx};

/// The checkpoints of `accounts` for `projection`, locked until `tx` ends (PostgreSQL;
/// SQLite has one writer). An account never seen is at 0.
pub async fn lock(
    tx: &mut Tx,
    projection: &str,
    accounts: &[&str],
) -> Result<HashMap<String, u64>, StoreError> {
    let rows: Vec<(String, i64)> = match tx {
        Tx::Pg(t) => {
            // Serialise on the rows (a new account on its insertion).
            sqlx::query(
                "INSERT INTO projection_checkpoints (projection, account_id, sequence) \
                 SELECT $1, a, 0 FROM unnest($2::text[]) AS a ON CONFLICT DO NOTHING",
            )
            .bind(projection)
            .bind(accounts)
            .execute(&mut **t)
            .await?;
            sqlx::query_as(
                "SELECT account_id, sequence FROM projection_checkpoints \
                 WHERE projection = $1 AND account_id = ANY($2) ORDER BY account_id FOR UPDATE",
            )
            .bind(projection)
            .bind(accounts)
            .fetch_all(&mut **t)
            .await?
        }
        Tx::Lite(t) => {
            // SQLite has one writer: no lock needed, one read per chunk of accounts.
            let mut rows = Vec::with_capacity(accounts.len());
            for chunk in accounts.chunks(900) {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "SELECT account_id, sequence FROM projection_checkpoints WHERE projection = ",
                );
                q.push_bind(projection).push(" AND account_id IN (");
                let mut list = q.separated(", ");
                for account in chunk {
                    list.push_bind(*account);
                }
                q.push(")");
                rows.extend(
                    q.build_query_as::<(String, i64)>()
                        .fetch_all(&mut **t)
                        .await?,
                );
            }
            rows
        }
    };
    Ok(rows
        .into_iter()
        .map(|(a, s)| (a, s.max(0) as u64))
        .collect())
}

/// Moves `projection`'s checkpoints to the given sequences.
pub async fn set(tx: &mut Tx, projection: &str, moved: &[(&str, u64)]) -> Result<(), StoreError> {
    if moved.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Pg(t) => {
            let accounts: Vec<&str> = moved.iter().map(|(a, _)| *a).collect();
            let sequences: Vec<i64> = moved.iter().map(|(_, s)| *s as i64).collect();
            sqlx::query(
                "INSERT INTO projection_checkpoints (projection, account_id, sequence) \
                 SELECT $1, a, s FROM unnest($2::text[], $3::bigint[]) AS t(a, s) \
                 ON CONFLICT (projection, account_id) DO UPDATE SET sequence = excluded.sequence",
            )
            .bind(projection)
            .bind(&accounts)
            .bind(&sequences)
            .execute(&mut **t)
            .await?;
        }
        Tx::Lite(t) => {
            for chunk in moved.chunks(1000) {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "INSERT INTO projection_checkpoints (projection, account_id, sequence) ",
                );
                q.push_values(chunk, |mut b, (account, sequence)| {
                    b.push_bind(projection)
                        .push_bind(*account)
                        .push_bind(*sequence as i64);
                });
                q.push(" ON CONFLICT (projection, account_id) DO UPDATE SET sequence = excluded.sequence");
                q.build().execute(&mut **t).await?;
            }
        }
    }
    Ok(())
}

/// The checkpoint of one account (0 when none).
pub async fn get(store: &Store, projection: &str, account: &str) -> Result<u64, StoreError> {
    let at: Option<i64> = with_pool!(store, |pool| {
        sqlx::query_scalar(
            "SELECT sequence FROM projection_checkpoints WHERE projection = $1 AND account_id = $2",
        )
        .bind(projection)
        .bind(account)
        .fetch_optional(pool)
        .await?
    });
    Ok(at.unwrap_or(0).max(0) as u64)
}

/// Every checkpoint of `projection`.
pub async fn all(store: &Store, projection: &str) -> Result<HashMap<String, u64>, StoreError> {
    with_pool!(store, |pool| {
        Ok(sqlx::query(
            "SELECT account_id, sequence FROM projection_checkpoints WHERE projection = $1",
        )
        .bind(projection)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1).max(0) as u64))
        .collect())
    })
}
