//! Events: the facts keyledger records, version 1.
//!
//! Each event is one struct; [`KeyringEvent`] is their union as stored in the event store
//! (externally tagged by type name, the cqrs-es convention). No event ever holds a
//! plaintext key: only its keyed-BLAKE3 hash (hex) and its last five characters. Every
//! event carries the `command_id` that caused it, so that a redelivered command can be
//! recognised from the log alone.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of every event type in this crate.
pub const EVENT_VERSION: &str = "1";

/// A new key was issued (by GenerateKey, or as the successor in a rotation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyGenerated {
    pub command_id: Uuid,
    pub key_id: Uuid,
    pub label: String,
    pub last_five: String,
    /// Hex of the keyed BLAKE3 hash of the whole key.
    pub key_hash: String,
    /// Always `blake3-keyed-v1` for keys issued by keyledger.
    pub hash_scheme: String,
    pub contacts: Vec<String>,
    /// The account's login email at the time (the first key of an account records it).
    pub login_email: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set when this key is the successor of a rotated key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<Uuid>,
}

/// The contact emails of a key were replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContactsUpdated {
    pub command_id: Uuid,
    pub key_id: Uuid,
    pub contacts: Vec<String>,
    pub updated_at: DateTime<Utc>,
}

/// A key was revoked (deleted): it fails verification at once and leaves the listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyRevoked {
    pub command_id: Uuid,
    pub key_id: Uuid,
    pub revoked_at: DateTime<Utc>,
    /// Why: absent for a revocation someone asked for (`requested`), `rotated` when a
    /// rotation ended on the successor's first use, `leaked` for a leak report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<RevokeCause>,
    /// Where a leaked key was found (with `cause = leaked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Who reported a leaked key, as the report said (free text).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reporter: String,
    /// For a leaked key, who is told at once: its contacts, or the login email when it has
    /// none (empty for other revocations, which tell no one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// For a leaked key, the key as named in the notice.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_five: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub login_email: String,
}

/// Why a key was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RevokeCause {
    /// A caller revoked it (RevokeKey); recorded as no cause at all.
    Requested,
    /// Its successor was verified for the first time (`revoke_old_on_first_use`).
    Rotated,
    /// It was reported as leaked.
    Leaked,
}

impl RevokeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeCause::Requested => "requested",
            RevokeCause::Rotated => "rotated",
            RevokeCause::Leaked => "leaked",
        }
    }
}

/// A key was rotated: its successor is `new_key_id` (issued by the KeyGenerated event of
/// the same command) and its own expiry was cut to `old_key_expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyRotated {
    pub command_id: Uuid,
    pub old_key_id: Uuid,
    pub new_key_id: Uuid,
    pub old_key_expires_at: DateTime<Utc>,
    pub rotated_at: DateTime<Utc>,
    /// The old key is revoked (`cause = rotated`) as soon as the new one is first verified,
    /// and at the latest expires at `old_key_expires_at`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoke_old_on_first_use: bool,
}

/// A key reached its expiry and this was recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyExpired {
    pub command_id: Uuid,
    pub key_id: Uuid,
    /// The key's expiry (when it stopped verifying).
    pub expires_at: DateTime<Utc>,
    /// When the expiry was recorded (at or after `expires_at`).
    pub expired_at: DateTime<Utc>,
    /// Who is told: the key's contacts at that moment, or the login email when it has none.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// The key as named in the notice.
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub last_five: String,
    #[serde(default)]
    pub login_email: String,
}

/// A legacy (pre-multi-key) key was brought over as an ordinary key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LegacyKeyMigrated {
    pub command_id: Uuid,
    pub key_id: Uuid,
    /// Always `default`.
    pub label: String,
    /// Always `*****`: only a hash of the legacy key exists.
    pub last_five: String,
    /// Postman's `{username}_v1_{bcrypt hash without the salt}`.
    pub legacy_hash: String,
    /// Always `postman-bcrypt-v1`.
    pub hash_scheme: String,
    pub login_email: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub migrated_at: DateTime<Utc>,
}

/// A reminder stage of a key fell due and was decided: its recipients are told once.
/// Decided by the aggregate on the saga's SendExpiryReminder, only for a live key and a
/// stage not sent or skipped before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExpiryReminderDue {
    pub command_id: Uuid,
    pub key_id: Uuid,
    /// Days before expiry: 28, 14, 3 or 1 by default.
    pub stage: u32,
    /// The key's contacts at this moment, or the login email when it has none.
    pub recipients: Vec<String>,
    pub expires_at: DateTime<Utc>,
    /// When the stage fell due (`expires_at` minus `stage` days); earlier than the event's
    /// time when it is sent late, after downtime.
    pub due_at: DateTime<Utc>,
    /// Earlier stages that were overdue too and are recorded as skipped, never sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_stages: Vec<u32>,
    /// The key as named in the reminder.
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub last_five: String,
    #[serde(default)]
    pub login_email: String,
    /// When the key was last verified, as the usage table knew when the reminder fell due
    /// (absent when never used or not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    /// The usage table knew of no verification of the key at all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never_used: bool,
}

/// Every event of a keyring, as stored (externally tagged by its type name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum KeyringEvent {
    KeyGenerated(KeyGenerated),
    ContactsUpdated(ContactsUpdated),
    KeyRevoked(KeyRevoked),
    KeyRotated(KeyRotated),
    KeyExpired(KeyExpired),
    LegacyKeyMigrated(LegacyKeyMigrated),
    ExpiryReminderDue(ExpiryReminderDue),
}

impl KeyringEvent {
    /// The stable type name (`KeyGenerated`, …), as in the event envelope.
    pub fn event_type(&self) -> &'static str {
        match self {
            KeyringEvent::KeyGenerated(_) => "KeyGenerated",
            KeyringEvent::ContactsUpdated(_) => "ContactsUpdated",
            KeyringEvent::KeyRevoked(_) => "KeyRevoked",
            KeyringEvent::KeyRotated(_) => "KeyRotated",
            KeyringEvent::KeyExpired(_) => "KeyExpired",
            KeyringEvent::LegacyKeyMigrated(_) => "LegacyKeyMigrated",
            KeyringEvent::ExpiryReminderDue(_) => "ExpiryReminderDue",
        }
    }

    /// The command that caused this event.
    pub fn command_id(&self) -> Uuid {
        match self {
            KeyringEvent::KeyGenerated(e) => e.command_id,
            KeyringEvent::ContactsUpdated(e) => e.command_id,
            KeyringEvent::KeyRevoked(e) => e.command_id,
            KeyringEvent::KeyRotated(e) => e.command_id,
            KeyringEvent::KeyExpired(e) => e.command_id,
            KeyringEvent::LegacyKeyMigrated(e) => e.command_id,
            KeyringEvent::ExpiryReminderDue(e) => e.command_id,
        }
    }

    /// The event of type `event_type` whose payload (the inner struct, as in the event
    /// envelope) is the JSON text `payload`.
    pub fn from_payload(event_type: &str, payload: &str) -> Result<Self, serde_json::Error> {
        use serde::de::Error;
        Ok(match event_type {
            "KeyGenerated" => Self::KeyGenerated(serde_json::from_str(payload)?),
            "ContactsUpdated" => Self::ContactsUpdated(serde_json::from_str(payload)?),
            "KeyRevoked" => Self::KeyRevoked(serde_json::from_str(payload)?),
            "KeyRotated" => Self::KeyRotated(serde_json::from_str(payload)?),
            "KeyExpired" => Self::KeyExpired(serde_json::from_str(payload)?),
            "LegacyKeyMigrated" => Self::LegacyKeyMigrated(serde_json::from_str(payload)?),
            "ExpiryReminderDue" => Self::ExpiryReminderDue(serde_json::from_str(payload)?),
            other => return Err(serde_json::Error::unknown_variant(other, Self::TYPES)),
        })
    }

    /// Every event type name.
    pub const TYPES: &'static [&'static str] = &[
        "KeyGenerated",
        "ContactsUpdated",
        "KeyRevoked",
        "KeyRotated",
        "KeyExpired",
        "LegacyKeyMigrated",
        "ExpiryReminderDue",
    ];

    /// The payload alone (the inner struct), as published in the event envelope.
    pub fn payload(&self) -> serde_json::Value {
        let tagged = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        match tagged {
            serde_json::Value::Object(mut map) => map
                .remove(self.event_type())
                .unwrap_or(serde_json::Value::Null),
            other => other,
        }
    }

    /// The keys this event is about: its own key, and for a rotation (or the successor a
    /// rotation issued) the other key of the pair.
    pub fn key_ids(&self) -> [Option<Uuid>; 2] {
        match self {
            KeyringEvent::KeyGenerated(e) => [Some(e.key_id), e.rotated_from],
            KeyringEvent::ContactsUpdated(e) => [Some(e.key_id), None],
            KeyringEvent::KeyRevoked(e) => [Some(e.key_id), None],
            KeyringEvent::KeyRotated(e) => [Some(e.old_key_id), Some(e.new_key_id)],
            KeyringEvent::KeyExpired(e) => [Some(e.key_id), None],
            KeyringEvent::LegacyKeyMigrated(e) => [Some(e.key_id), None],
            KeyringEvent::ExpiryReminderDue(e) => [Some(e.key_id), None],
        }
    }

    /// Whether this event is about `key_id`.
    pub fn concerns(&self, key_id: Uuid) -> bool {
        self.key_ids().contains(&Some(key_id))
    }

    /// When the fact happened, by the aggregate's clock.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            KeyringEvent::KeyGenerated(e) => e.created_at,
            KeyringEvent::ContactsUpdated(e) => e.updated_at,
            KeyringEvent::KeyRevoked(e) => e.revoked_at,
            KeyringEvent::KeyRotated(e) => e.rotated_at,
            KeyringEvent::KeyExpired(e) => e.expired_at,
            KeyringEvent::LegacyKeyMigrated(e) => e.migrated_at,
            KeyringEvent::ExpiryReminderDue(e) => e.due_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_the_inner_struct() {
        let id = Uuid::nil();
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let e = KeyringEvent::KeyRevoked(KeyRevoked {
            command_id: id,
            key_id: id,
            revoked_at: now,
            cause: None,
            source: None,
            ..Default::default()
        });
        let p = e.payload();
        assert_eq!(p["key_id"], serde_json::json!(id.to_string()));
        assert_eq!(e.event_type(), "KeyRevoked");
        let stored = serde_json::to_value(&e).expect("serialises");
        assert!(stored.get("KeyRevoked").is_some());
    }
}
