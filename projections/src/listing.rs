//! The Settings listing: one row per non-revoked key of an account.
//!
//! [`listing_change`] turns one event into the change it makes to the listing; the
//! in-memory [`Listing`] and the SQL stores of the service both apply those same changes,
//! so there is one definition of what the listing is. The in-memory fold also keeps the
//! revoked keys aside ([`Listing::rows_with_inactive`]): it is what answers
//! `include=inactive` and `as_of` (the listing as it stood at an instant, folded from the
//! log), and what `audit --until` rebuilds.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use keyledger_events::{KeyringEvent, RevokeCause};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The status shown for a listed key. Revoked keys are listed only on request
/// (`include=inactive`); the listing table never holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyStatus::Active),
            "expired" => Some(KeyStatus::Expired),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }
}

/// When and why a key was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub at: DateTime<Utc>,
    pub cause: RevokeCause,
}

/// One row of the Settings page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingRow {
    pub account_id: String,
    pub key_id: Uuid,
    pub label: String,
    pub last_five: String,
    pub contacts: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub status: KeyStatus,
    /// Set on a revoked key (only ever in the in-memory fold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

impl ListingRow {
    /// The status as of `now`: a key past its expiry shows as expired even before its
    /// KeyExpired event has been recorded.
    pub fn status_at(&self, now: DateTime<Utc>) -> KeyStatus {
        if self.status == KeyStatus::Active && self.expires_at <= now {
            KeyStatus::Expired
        } else {
            self.status
        }
    }
}

/// The change one event makes to the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingChange {
    Insert(ListingRow),
    SetContacts {
        key_id: Uuid,
        contacts: Vec<String>,
    },
    SetExpiry {
        key_id: Uuid,
        expires_at: DateTime<Utc>,
    },
    MarkExpired {
        key_id: Uuid,
    },
    Remove {
        key_id: Uuid,
        revocation: Revocation,
    },
    Nothing,
}

/// What `event` of `account_id` does to the listing.
pub fn listing_change(account_id: &str, event: &KeyringEvent) -> ListingChange {
    match event {
        KeyringEvent::KeyGenerated(e) => ListingChange::Insert(ListingRow {
            account_id: account_id.to_owned(),
            key_id: e.key_id,
            label: e.label.clone(),
            last_five: e.last_five.clone(),
            contacts: e.contacts.clone(),
            created_at: e.created_at,
            expires_at: e.expires_at,
            status: KeyStatus::Active,
            revoked: None,
        }),
        KeyringEvent::LegacyKeyMigrated(e) => ListingChange::Insert(ListingRow {
            account_id: account_id.to_owned(),
            key_id: e.key_id,
            label: e.label.clone(),
            last_five: e.last_five.clone(),
            contacts: Vec::new(),
            created_at: e.created_at,
            expires_at: e.expires_at,
            status: KeyStatus::Active,
            revoked: None,
        }),
        KeyringEvent::ContactsUpdated(e) => ListingChange::SetContacts {
            key_id: e.key_id,
            contacts: e.contacts.clone(),
        },
        KeyringEvent::KeyRotated(e) => ListingChange::SetExpiry {
            key_id: e.old_key_id,
            expires_at: e.old_key_expires_at,
        },
        KeyringEvent::KeyExpired(e) => ListingChange::MarkExpired { key_id: e.key_id },
        KeyringEvent::KeyRevoked(e) => ListingChange::Remove {
            key_id: e.key_id,
            revocation: Revocation {
                at: e.revoked_at,
                cause: e.cause.unwrap_or(RevokeCause::Requested),
            },
        },
        KeyringEvent::ExpiryReminderDue(_) => ListingChange::Nothing,
    }
}

/// Whether `event` had happened by `until`: the cut of `audit --until` and of the listing
/// `as_of` an instant (each event by its own time, as the aggregate's clock recorded it).
pub fn happened_by(event: &KeyringEvent, until: DateTime<Utc>) -> bool {
    event.occurred_at() <= until
}

/// The listing held in memory (used for replays, audits and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    accounts: BTreeMap<String, AccountListing>,
}

/// One account's rows and the last sequence applied to them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct AccountListing {
    applied: u64,
    rows: BTreeMap<Uuid, ListingRow>,
    /// Revoked keys, as they stood when revoked.
    revoked: BTreeMap<Uuid, ListingRow>,
}

impl Listing {
    /// Applies `event`, the `sequence`-th of `account_id`; returns false (and changes
    /// nothing) when that sequence was already applied.
    pub fn apply(&mut self, account_id: &str, sequence: u64, event: &KeyringEvent) -> bool {
        if !self.accounts.contains_key(account_id) {
            self.accounts
                .insert(account_id.to_owned(), AccountListing::default());
        }
        let Some(account) = self.accounts.get_mut(account_id) else {
            return false;
        };
        if sequence <= account.applied {
            return false;
        }
        account.applied = sequence;
        let (rows, revoked) = (&mut account.rows, &mut account.revoked);
        match listing_change(account_id, event) {
            ListingChange::Insert(row) => {
                rows.insert(row.key_id, row);
            }
            ListingChange::SetContacts { key_id, contacts } => {
                if let Some(row) = rows.get_mut(&key_id) {
                    row.contacts = contacts;
                }
            }
            ListingChange::SetExpiry { key_id, expires_at } => {
                if let Some(row) = rows.get_mut(&key_id) {
                    row.expires_at = expires_at;
                }
            }
            ListingChange::MarkExpired { key_id } => {
                if let Some(row) = rows.get_mut(&key_id) {
                    row.status = KeyStatus::Expired;
                }
            }
            ListingChange::Remove { key_id, revocation } => {
                if let Some(mut row) = rows.remove(&key_id) {
                    row.status = KeyStatus::Revoked;
                    row.revoked = Some(revocation);
                    revoked.insert(key_id, row);
                }
            }
            ListingChange::Nothing => {}
        }
        true
    }

    /// The rows of one account, ordered by creation time then key id.
    pub fn rows_of(&self, account_id: &str) -> Vec<ListingRow> {
        let mut rows: Vec<ListingRow> = self
            .accounts
            .get(account_id)
            .map(|a| a.rows.values().cloned().collect())
            .unwrap_or_default();
        rows.sort_by_key(|r| (r.created_at, r.key_id));
        rows
    }

    /// The rows of one account with its revoked keys too, ordered by creation time then
    /// key id.
    pub fn rows_with_inactive(&self, account_id: &str) -> Vec<ListingRow> {
        let mut rows: Vec<ListingRow> = self
            .accounts
            .get(account_id)
            .map(|a| a.rows.values().chain(a.revoked.values()).cloned().collect())
            .unwrap_or_default();
        rows.sort_by_key(|r| (r.created_at, r.key_id));
        rows
    }

    /// Every row, ordered by account, creation time, key id.
    pub fn all_rows(&self) -> Vec<ListingRow> {
        let mut all = Vec::new();
        for account in self.accounts.keys() {
            all.extend(self.rows_of(account));
        }
        all
    }

    /// Takes in the accounts of `other` (a listing of other accounts, folded apart).
    pub fn merge(&mut self, other: Listing) {
        self.accounts.extend(other.accounts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyledger_events::{KeyGenerated, KeyRevoked, KeyRotated};

    fn generated(key_id: Uuid, label: &str) -> KeyringEvent {
        KeyringEvent::KeyGenerated(KeyGenerated {
            command_id: Uuid::new_v4(),
            key_id,
            label: label.into(),
            last_five: "abcde".into(),
            key_hash: "00".repeat(32),
            hash_scheme: keyledger_events::HASH_SCHEME_BLAKE3.into(),
            contacts: vec!["a@b.sg".into()],
            login_email: "a@b.sg".into(),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            expires_at: DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(180),
            rotated_from: None,
        })
    }

    #[test]
    fn fold_inserts_rotates_and_removes_and_skips_replays() {
        let (k1, k2) = (Uuid::new_v4(), Uuid::new_v4());
        let mut l = Listing::default();
        assert!(l.apply("acc", 1, &generated(k1, "one")));
        assert!(l.apply("acc", 2, &generated(k2, "two")));
        let cut = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(1);
        let rotated = KeyringEvent::KeyRotated(KeyRotated {
            command_id: Uuid::new_v4(),
            old_key_id: k1,
            new_key_id: k2,
            old_key_expires_at: cut,
            rotated_at: cut,
            revoke_old_on_first_use: false,
        });
        assert!(l.apply("acc", 3, &rotated));
        assert!(
            !l.apply("acc", 3, &rotated),
            "a replayed sequence is skipped"
        );
        let row = |l: &Listing, k| l.rows_of("acc").into_iter().find(|r| r.key_id == k);
        assert_eq!(row(&l, k1).map(|r| r.expires_at), Some(cut));
        let revoked = KeyringEvent::KeyRevoked(KeyRevoked {
            command_id: Uuid::new_v4(),
            key_id: k1,
            revoked_at: cut,
            cause: None,
            source: None,
            ..Default::default()
        });
        l.apply("acc", 4, &revoked);
        let rows = l.rows_of("acc");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key_id, k2);
        assert_eq!(
            rows[0].status_at(cut + chrono::Duration::days(365)),
            KeyStatus::Expired
        );
    }
}
