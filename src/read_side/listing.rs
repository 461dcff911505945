//! The listing table (`key_listing`): the Settings page, one row per listed key, and the
//! read model other services query with plain SQL. A projection of the log
//! ([`ListingTable`], checkpoints `listing`) whose one definition of a change is
//! [`listing_change`]; the queries that read it are here too.
//!
//! On PostgreSQL new rows are written many at a time (one statement per batch, through
//! `unnest`), so a first start on an imported history writes a million rows in seconds;
//! other changes are single statements, in order. SQLite keeps contacts as JSON text and
//! ids as text (its dialect's difference), one statement per change.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyledger_projections::{listing_change, KeyStatus, ListingChange, ListingRow};
use sqlx::Row;
use uuid::Uuid;

use crate::projection::Projection;
use crate::store::{Backend, Store, StoreError, StoredRecord, Tx};

/// The listing's checkpoint name.
pub const LISTING: &str = "listing";

/// The listing table as a projection of the log.
pub struct ListingTable;

#[async_trait]
impl Projection for ListingTable {
    fn name(&self) -> &'static str {
        LISTING
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        batch: &[(&str, &[StoredRecord])],
    ) -> Result<(), StoreError> {
        let mut inserts: Vec<ListingRow> = Vec::new();
        for (account, records) in batch {
            for record in *records {
                match listing_change(account, &record.event) {
                    ListingChange::Insert(row) => inserts.push(row),
                    ListingChange::Nothing => {}
                    other => {
                        // Rows inserted earlier in this batch must exist before they change.
                        insert_rows(tx, &mut inserts).await?;
                        change_row(tx, account, other).await?;
                    }
                }
            }
        }
        insert_rows(tx, &mut inserts).await
    }
}

/// Inserts `rows` (and empties the list).
async fn insert_rows(tx: &mut Tx, rows: &mut Vec<ListingRow>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Pg(t) => {
            let column = |f: fn(&ListingRow) -> String| rows.iter().map(f).collect::<Vec<_>>();
            // Contacts travel as one text each, one address a line (an address holds no
            // line break), split back into an array by the database.
            let contacts: Vec<String> = rows.iter().map(|r| r.contacts.join("\n")).collect();
            let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
            let expires: Vec<DateTime<Utc>> = rows.iter().map(|r| r.expires_at).collect();
            let key_ids: Vec<Uuid> = rows.iter().map(|r| r.key_id).collect();
            sqlx::query(
                "INSERT INTO key_listing (account_id, key_id, label, last_five, contacts, created_at, expires_at, status) \
                 SELECT a, k, l, f, string_to_array(c, E'\\n'), ca, ea, s \
                 FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                             $6::timestamptz[], $7::timestamptz[], $8::text[]) AS t(a, k, l, f, c, ca, ea, s) \
                 ON CONFLICT (account_id, key_id) DO NOTHING",
            )
            .bind(column(|r| r.account_id.clone()))
            .bind(&key_ids)
            .bind(column(|r| r.label.clone()))
            .bind(column(|r| r.last_five.clone()))
            .bind(&contacts)
            .bind(&created)
            .bind(&expires)
            .bind(column(|r| r.status.as_str().to_owned()))
            .execute(&mut **t)
            .await?;
        }
        Tx::Lite(t) => {
            // Many rows a statement (8 parameters each, within SQLite's limit).
            for chunk in rows.chunks(500) {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "INSERT INTO key_listing (account_id, key_id, label, last_five, contacts, created_at, expires_at, status) ",
                );
                q.push_values(chunk, |mut b, row| {
                    b.push_bind(row.account_id.clone())
                        .push_bind(row.key_id.to_string())
                        .push_bind(row.label.clone())
                        .push_bind(row.last_five.clone())
                        .push_bind(json_list(&row.contacts))
                        .push_bind(row.created_at)
                        .push_bind(row.expires_at)
                        .push_bind(row.status.as_str());
                });
                q.push(" ON CONFLICT (account_id, key_id) DO NOTHING");
                q.build().execute(&mut **t).await?;
            }
        }
    }
    rows.clear();
    Ok(())
}

/// Applies one change other than an insert.
async fn change_row(tx: &mut Tx, account: &str, change: ListingChange) -> Result<(), StoreError> {
    // (SQL, key id, the new value) — the statements are the same on both databases; ids and
    // contacts are bound as each stores them.
    macro_rules! run {
        ($sql:expr, $key:expr $(, $value:expr)?) => {
            match tx {
                Tx::Pg(t) => {
                    sqlx::query($sql).bind(account).bind($key)$(.bind($value.pg()))?
                        .execute(&mut **t).await?;
                }
                Tx::Lite(t) => {
                    sqlx::query($sql).bind(account).bind($key.to_string())$(.bind($value.lite()))?
                        .execute(&mut **t).await?;
                }
            }
        };
    }
    match change {
        ListingChange::SetContacts { key_id, contacts } => run!(
            "UPDATE key_listing SET contacts = $3 WHERE account_id = $1 AND key_id = $2",
            key_id,
            Contacts(contacts)
        ),
        ListingChange::SetExpiry { key_id, expires_at } => run!(
            "UPDATE key_listing SET expires_at = $3 WHERE account_id = $1 AND key_id = $2",
            key_id,
            Same(expires_at)
        ),
        ListingChange::MarkExpired { key_id } => run!(
            "UPDATE key_listing SET status = 'expired' WHERE account_id = $1 AND key_id = $2",
            key_id
        ),
        ListingChange::Remove { key_id, .. } => run!(
            "DELETE FROM key_listing WHERE account_id = $1 AND key_id = $2",
            key_id
        ),
        ListingChange::Insert(_) | ListingChange::Nothing => {}
    }
    Ok(())
}

/// Contacts as each database stores them: `text[]` on PostgreSQL, JSON text on SQLite.
struct Contacts(Vec<String>);

impl Contacts {
    fn pg(&self) -> &Vec<String> {
        &self.0
    }
    fn lite(&self) -> String {
        json_list(&self.0)
    }
}

/// A value both databases store alike.
struct Same<T>(T);

impl<T: Copy> Same<T> {
    fn pg(&self) -> T {
        self.0
    }
    fn lite(&self) -> T {
        self.0
    }
}

fn json_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".into())
}

/// The listing rows of one account (or every account), ordered by account, creation time,
/// key id.
pub async fn rows(store: &Store, account_id: Option<&str>) -> Result<Vec<ListingRow>, StoreError> {
    let sql = "SELECT account_id, key_id, label, last_five, contacts, created_at, expires_at, status \
               FROM key_listing WHERE ($1 IS NULL OR account_id = $1) ORDER BY account_id, created_at, key_id";
    let decode_err = |e: Box<dyn std::error::Error + Send + Sync>| sqlx::Error::Decode(e);
    let rows: Result<Vec<ListingRow>, sqlx::Error> = match &store.backend {
        Backend::Postgres { pool, .. } => sqlx::query(sql)
            .bind(account_id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok(ListingRow {
                    account_id: r.try_get("account_id")?,
                    key_id: r.try_get("key_id")?,
                    label: r.try_get("label")?,
                    last_five: r.try_get("last_five")?,
                    contacts: r.try_get("contacts")?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                    status: status(r.try_get("status")?),
                    revoked: None,
                })
            })
            .collect(),
        Backend::Sqlite { pool, .. } => sqlx::query(sql)
            .bind(account_id)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                let key_id: String = r.try_get("key_id")?;
                let contacts: String = r.try_get("contacts")?;
                Ok(ListingRow {
                    account_id: r.try_get("account_id")?,
                    key_id: Uuid::parse_str(&key_id).map_err(|e| decode_err(Box::new(e)))?,
                    label: r.try_get("label")?,
                    last_five: r.try_get("last_five")?,
                    contacts: serde_json::from_str(&contacts)
                        .map_err(|e| decode_err(Box::new(e)))?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                    status: status(r.try_get("status")?),
                    revoked: None,
                })
            })
            .collect(),
    };
    Ok(rows?)
}

fn status(s: &str) -> KeyStatus {
    KeyStatus::parse(s).unwrap_or(KeyStatus::Active)
}
