//! What the log knows, on demand: the listing as it stood at any instant (revoked keys
//! included when asked) and the whole history of one key.
//!
//! Both are folded from the account's events in the store when asked (one indexed read of
//! one account's stream), with the same fold and the same cut as `audit --until`
//! ([`keyledger_projections::Listing`], [`keyledger_projections::happened_by`]); nothing is
//! kept beside the log for them.

use chrono::{DateTime, Utc};
use keyledger_projections::{happened_by, Listing, ListingRow};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::{Store, StoreError, StoredRecord};

/// The rows of `account_id` as they stood at `as_of` (every event when `None`), with the
/// revoked keys when `inactive`.
pub async fn listing_at(
    store: &Store,
    account_id: &str,
    as_of: Option<DateTime<Utc>>,
    inactive: bool,
) -> Result<Vec<ListingRow>, StoreError> {
    let records = store.life_of(account_id).await?;
    Ok(fold(account_id, &records, as_of, inactive))
}

/// The pure part of [`listing_at`].
pub fn fold(
    account_id: &str,
    records: &[StoredRecord],
    as_of: Option<DateTime<Utc>>,
    inactive: bool,
) -> Vec<ListingRow> {
    let mut listing = Listing::default();
    for r in records {
        if as_of.is_none_or(|t| happened_by(&r.event, t)) {
            listing.apply(account_id, r.sequence, &r.event);
        }
    }
    if inactive {
        listing.rows_with_inactive(account_id)
    } else {
        listing.rows_of(account_id)
    }
}

/// One event of a key's history, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moment {
    pub sequence: u64,
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    /// Who issued the command (a token's name, `saga`, `first-use`, `bus:<sender>`).
    pub actor: Option<String>,
    /// The event's payload, without the key's hash (verifier material, not history).
    pub payload: serde_json::Value,
}

/// Fields of a payload the history leaves out.
const WITHHELD: &[&str] = &["key_hash", "legacy_hash"];

/// Every event of `account_id` about `key_id`, in order; empty when the account holds no
/// such key.
pub async fn of_key(
    store: &Store,
    account_id: &str,
    key_id: Uuid,
) -> Result<Vec<Moment>, StoreError> {
    let records = store.life_of(account_id).await?;
    Ok(moments(&records, key_id))
}

/// The pure part of [`of_key`].
pub fn moments(records: &[StoredRecord], key_id: Uuid) -> Vec<Moment> {
    records
        .iter()
        .filter(|r| r.event.concerns(key_id))
        .map(|r| {
            let mut payload = r.event.payload();
            if let Some(map) = payload.as_object_mut() {
                for field in WITHHELD {
                    map.remove(*field);
                }
            }
            Moment {
                sequence: r.sequence,
                event_type: r.event.event_type().to_owned(),
                occurred_at: r.event.occurred_at(),
                actor: r.actor.clone(),
                payload,
            }
        })
        .collect()
}
