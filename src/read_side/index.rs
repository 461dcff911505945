//! The persisted verification index (`verification_index`, `index_accounts`; PostgreSQL
//! with the bus): the index as a table, built by the projector, so that other services
//! and auditors can read what every instance verifies against. A projection of the log
//! ([`PersistedIndex`], checkpoints `index`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyledger_events::KeyringEvent as E;
use sqlx::Row;
use uuid::Uuid;

use crate::projection::Projection;
use crate::store::{Store, StoreError, StoredRecord, Tx};

/// The persisted index's checkpoint name.
pub const INDEX: &str = "index";

/// The persisted verification index as a projection of the log.
pub struct PersistedIndex;

/// A key as the persisted index holds it.
struct NewKey<'a> {
    account_id: &'a str,
    login_email: &'a str,
    key_id: Uuid,
    key_hash: Option<&'a str>,
    legacy_hash: Option<&'a str>,
    label: &'a str,
    expires_at: DateTime<Utc>,
}

#[async_trait]
impl Projection for PersistedIndex {
    fn name(&self) -> &'static str {
        INDEX
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        batch: &[(&str, &[StoredRecord])],
    ) -> Result<(), StoreError> {
        let c = tx
            .pg()
            .ok_or(StoreError::PostgresOnly("the persisted index"))?;
        let mut new: Vec<NewKey<'_>> = Vec::new();
        for (account_id, records) in batch {
            for record in *records {
                match &record.event {
                    E::KeyGenerated(e) => new.push(NewKey {
                        account_id,
                        login_email: &e.login_email,
                        key_id: e.key_id,
                        key_hash: Some(&e.key_hash),
                        legacy_hash: None,
                        label: &e.label,
                        expires_at: e.expires_at,
                    }),
                    E::LegacyKeyMigrated(e) => new.push(NewKey {
                        account_id,
                        login_email: &e.login_email,
                        key_id: e.key_id,
                        key_hash: None,
                        legacy_hash: Some(&e.legacy_hash),
                        label: &e.label,
                        expires_at: e.expires_at,
                    }),
                    other => {
                        // Keys inserted earlier in this batch must exist before they change.
                        insert(c, &mut new).await?;
                        change(c, account_id, other).await?;
                    }
                }
            }
        }
        insert(c, &mut new).await
    }
}

async fn insert(c: &mut sqlx::PgConnection, keys: &mut Vec<NewKey<'_>>) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let accounts: Vec<&str> = keys.iter().map(|k| k.account_id).collect();
    let logins: Vec<&str> = keys.iter().map(|k| k.login_email).collect();
    sqlx::query(
        "INSERT INTO index_accounts (account_id, login_email) \
         SELECT DISTINCT ON (a) a, l FROM unnest($1::text[], $2::text[]) AS t(a, l) \
         ON CONFLICT (account_id) DO NOTHING",
    )
    .bind(&accounts)
    .bind(&logins)
    .execute(&mut *c)
    .await?;
    let key_ids: Vec<Uuid> = keys.iter().map(|k| k.key_id).collect();
    let hashes: Vec<Option<&str>> = keys.iter().map(|k| k.key_hash).collect();
    let legacy: Vec<Option<&str>> = keys.iter().map(|k| k.legacy_hash).collect();
    let labels: Vec<&str> = keys.iter().map(|k| k.label).collect();
    let expires: Vec<DateTime<Utc>> = keys.iter().map(|k| k.expires_at).collect();
    sqlx::query(
        "INSERT INTO verification_index (account_id, key_id, key_hash, legacy_hash, label, expires_at, status) \
         SELECT a, k, h, g, l, e, 'active' \
         FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) \
              AS t(a, k, h, g, l, e) \
         ON CONFLICT (account_id, key_id) DO NOTHING",
    )
    .bind(&accounts)
    .bind(&key_ids)
    .bind(&hashes)
    .bind(&legacy)
    .bind(&labels)
    .bind(&expires)
    .execute(&mut *c)
    .await?;
    keys.clear();
    Ok(())
}

async fn change(c: &mut sqlx::PgConnection, account_id: &str, event: &E) -> Result<(), StoreError> {
    let set_status = |key_id: Uuid, status: &'static str, only_if_active: bool| {
        sqlx::query(
            "UPDATE verification_index SET status = $3 \
             WHERE account_id = $1 AND key_id = $2 AND (NOT $4 OR status = 'active')",
        )
        .bind(account_id)
        .bind(key_id)
        .bind(status)
        .bind(only_if_active)
    };
    match event {
        E::KeyRevoked(e) => {
            set_status(e.key_id, "revoked", false)
                .execute(&mut *c)
                .await?;
        }
        E::KeyExpired(e) => {
            set_status(e.key_id, "expired", true)
                .execute(&mut *c)
                .await?;
        }
        E::KeyRotated(e) => {
            sqlx::query(
                "UPDATE verification_index SET expires_at = LEAST(expires_at, $3) \
                 WHERE account_id = $1 AND key_id = $2",
            )
            .bind(account_id)
            .bind(e.old_key_id)
            .bind(e.old_key_expires_at)
            .execute(&mut *c)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// The (account, key id) whose keyed hash is `key_hash` (hex), from the persisted index,
/// whatever its state — for a leak report on an instance without the in-memory index.
/// None without PostgreSQL.
pub async fn find_by_hash(
    store: &Store,
    key_hash: &str,
) -> Result<Option<(String, Uuid)>, StoreError> {
    let Some(pool) = store.pg_pool() else {
        return Ok(None);
    };
    let row = sqlx::query("SELECT account_id, key_id FROM verification_index WHERE key_hash = $1")
        .bind(key_hash)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| (r.get("account_id"), r.get("key_id"))))
}

/// Most legacy keys of one username a leak report compares (bcrypt each): a username has
/// one or two in practice.
const LEGACY_PER_USERNAME: i64 = 16;

/// The migrated legacy keys of `username` in the persisted index, whatever their state, as
/// (account, key id, legacy hash) — for a leak report that the in-memory index cannot
/// answer (a commands-only instance, or a key revoked before this instance started).
/// Empty without PostgreSQL.
pub async fn legacy_of_username(
    store: &Store,
    username: &str,
) -> Result<Vec<(String, Uuid, String)>, StoreError> {
    let Some(pool) = store.pg_pool() else {
        return Ok(Vec::new());
    };
    // The expression and the condition of the index verification_index_legacy_by_username.
    let rows = sqlx::query(
        "SELECT account_id, key_id, legacy_hash FROM verification_index \
         WHERE legacy_hash IS NOT NULL AND split_part(legacy_hash, '_v1_', 1) = $1 \
         ORDER BY account_id, key_id LIMIT $2",
    )
    .bind(username)
    .bind(LEGACY_PER_USERNAME)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get("account_id"), r.get("key_id"), r.get("legacy_hash")))
        .collect())
}

/// One row of the persisted index.
pub struct IndexRow {
    pub account_id: String,
    pub key_id: Uuid,
    pub key_hash: Option<String>,
    pub legacy_hash: Option<String>,
    pub label: String,
    pub expires_at: DateTime<Utc>,
    pub status: String,
}

/// Every row of the persisted index (empty without PostgreSQL).
pub async fn rows(store: &Store) -> Result<Vec<IndexRow>, StoreError> {
    let Some(pool) = store.pg_pool() else {
        return Ok(Vec::new());
    };
    Ok(sqlx::query(
        "SELECT account_id, key_id, key_hash, legacy_hash, label, expires_at, status FROM verification_index",
    )
    .fetch_all(pool)
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
    .collect())
}
