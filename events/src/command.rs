//! Commands: what a caller asks keyledger to do.
//!
//! A [`CommandEnvelope`] is the unit that travels over the bus (`keyledger.commands`); the
//! HTTP API builds the same [`Command`] values, so both paths share one command handler.
//! Fields hold raw caller input (strings): parsing them into domain types is the
//! aggregate's job, so that a bad value yields a precise, typed rejection instead of an
//! opaque deserialisation error.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One command as it travels over the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandEnvelope {
    /// Chosen by the sender; a redelivered id changes nothing and gets the original answer.
    pub command_id: Uuid,
    /// The opaque account id the calling service owns.
    pub account_id: String,
    /// Who sent it, for the audit trail (e.g. `web-backend`).
    #[serde(default)]
    pub issued_by: Option<String>,
    pub command: Command,
    /// Base64 X25519 public key; required for GenerateKey and RotateKey over the bus, whose
    /// result carries the new key sealed to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_public_key: Option<String>,
}

/// The commands of the keyring, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
pub enum Command {
    /// Create a new key for the account.
    GenerateKey {
        label: String,
        contacts: Vec<String>,
        /// The account owner's login email; the first key of an account records it.
        login_email: String,
    },
    /// Replace the contact emails of a key.
    UpdateContacts { key_id: Uuid, contacts: Vec<String> },
    /// Revoke (delete) a key, at once and for good.
    RevokeKey { key_id: Uuid },
    /// Issue a successor with the same contacts and a new label; cut the old key's life to
    /// a grace period.
    RotateKey {
        key_id: Uuid,
        label: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_seconds: Option<i64>,
        /// Revoke the old key (`cause = rotated`) as soon as the new one is first verified
        /// instead of waiting for the end of the grace.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        revoke_old_on_first_use: bool,
    },
    /// Record that a key has reached its expiry (accepted only at or after it).
    ExpireKey { key_id: Uuid },
    /// The reminder saga's: record that reminder `stage` (days before expiry) of a key fell
    /// due. Accepted once per key and stage, only while the key is live and the stage is
    /// due; `skipping` names earlier stages, overdue too, to record as skipped.
    SendExpiryReminder {
        key_id: Uuid,
        stage: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipping: Vec<u32>,
        /// When the key was last verified, as the saga read the usage table (for the
        /// reminder to say; absent when never or not known).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_used_at: Option<DateTime<Utc>>,
        /// Since when usage is recorded: with no `last_used_at`, a key held since then was
        /// never used.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage_since: Option<DateTime<Utc>>,
    },
    /// keyledger's own, on the first verification of `new_key_id`: revoke the key it
    /// succeeded when that rotation asked for `revoke_old_on_first_use`. Issued with a
    /// command id derived from `new_key_id`, so however many instances see the first use,
    /// one revocation is recorded.
    RetireRotatedKey { new_key_id: Uuid },
    /// keyledger's own, for each live key of a leak report: revoke it (`cause = leaked`)
    /// and tell its contacts at once.
    RevokeLeakedKey {
        key_id: Uuid,
        source: String,
        /// Who reported it (free text of the report).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reporter: String,
    },
    /// Report keys found where they should not be (at most 100): each live key is revoked
    /// and its contacts told. Not a command of one keyring: the envelope's `account_id` is
    /// not used (any valid id, e.g. the reporter's). Its result lists, in order, what
    /// became of each key, by its last five characters only.
    ReportLeak {
        keys: LeakedKeys,
        /// Where the keys were found (a URL, a file, a ticket).
        source: String,
        /// Who reports (free text).
        #[serde(default)]
        reporter: String,
    },
    /// Bring over the account's single pre-multi-key (legacy) key.
    MigrateLegacyKey {
        login_email: String,
        legacy_hash: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_at: Option<DateTime<Utc>>,
    },
}

/// The keys of a leak report, as sent. Its `Debug` shows how many and their last five
/// characters only: a command may be logged, a key never.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct LeakedKeys(pub Vec<String>);

impl std::fmt::Debug for LeakedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ends: Vec<String> = self
            .0
            .iter()
            .map(|k| format!("…{}", crate::envelope::last_five(k)))
            .collect();
        f.debug_tuple("LeakedKeys").field(&ends).finish()
    }
}

/// The name of a command's type, for metrics, logs and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandType {
    GenerateKey,
    UpdateContacts,
    RevokeKey,
    RotateKey,
    ExpireKey,
    SendExpiryReminder,
    RetireRotatedKey,
    RevokeLeakedKey,
    ReportLeak,
    MigrateLegacyKey,
}

impl CommandType {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandType::GenerateKey => "GenerateKey",
            CommandType::UpdateContacts => "UpdateContacts",
            CommandType::RevokeKey => "RevokeKey",
            CommandType::RotateKey => "RotateKey",
            CommandType::ExpireKey => "ExpireKey",
            CommandType::SendExpiryReminder => "SendExpiryReminder",
            CommandType::RetireRotatedKey => "RetireRotatedKey",
            CommandType::RevokeLeakedKey => "RevokeLeakedKey",
            CommandType::ReportLeak => "ReportLeak",
            CommandType::MigrateLegacyKey => "MigrateLegacyKey",
        }
    }
}

impl Command {
    /// Whether only keyledger itself may issue this command (the reminder saga's
    /// SendExpiryReminder, the first-use RetireRotatedKey, the leak desk's
    /// RevokeLeakedKey): refused from HTTP and the bus with `forbidden_command`.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Command::SendExpiryReminder { .. }
                | Command::RetireRotatedKey { .. }
                | Command::RevokeLeakedKey { .. }
        )
    }

    pub fn command_type(&self) -> CommandType {
        match self {
            Command::GenerateKey { .. } => CommandType::GenerateKey,
            Command::UpdateContacts { .. } => CommandType::UpdateContacts,
            Command::RevokeKey { .. } => CommandType::RevokeKey,
            Command::RotateKey { .. } => CommandType::RotateKey,
            Command::ExpireKey { .. } => CommandType::ExpireKey,
            Command::SendExpiryReminder { .. } => CommandType::SendExpiryReminder,
            Command::RetireRotatedKey { .. } => CommandType::RetireRotatedKey,
            Command::RevokeLeakedKey { .. } => CommandType::RevokeLeakedKey,
            Command::ReportLeak { .. } => CommandType::ReportLeak,
            Command::MigrateLegacyKey { .. } => CommandType::MigrateLegacyKey,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_parses_the_contract_example() {
        let json = r#"{"command_id": "0b8f3c1e-9d4a-4f7e-8a51-2f0d1d5e6a70", "account_id": "acc-1",
            "issued_by": "web-backend",
            "command": {"type": "GenerateKey", "label": "prod", "contacts": ["a@b.gov.sg"],
                        "login_email": "john.doe@agency.gov.sg"},
            "reply_public_key": "AAAA"}"#;
        let env: CommandEnvelope = serde_json::from_str(json).expect("parses");
        assert_eq!(env.command.command_type(), CommandType::GenerateKey);
        assert_eq!(env.reply_public_key.as_deref(), Some("AAAA"));
    }

    #[test]
    fn unknown_command_type_is_an_error() {
        let json = r#"{"command_id": "0b8f3c1e-9d4a-4f7e-8a51-2f0d1d5e6a70", "account_id": "a",
            "command": {"type": "DropTables"}}"#;
        assert!(serde_json::from_str::<CommandEnvelope>(json).is_err());
    }
}
