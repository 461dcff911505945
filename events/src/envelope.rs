//! Envelopes of the bus: how events, command results and dead letters travel on Kafka.
//!
//! These are the JSON objects of `CONTRACT.md`. The event envelope wraps one stored event
//! with its place in the account's stream and the account's hash-chain value.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One stored event as published on `keyledger.events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub account_id: String,
    /// 1-based position in the account's stream; contiguous.
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at: DateTime<Utc>,
    pub command_id: Uuid,
    /// Hex BLAKE3 over the account's previous chain value and this event's canonical bytes.
    pub chain: String,
    pub payload: serde_json::Value,
}

/// The outcome of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Accepted,
    Rejected,
    Duplicate,
}

/// A machine code and a human message, the same on HTTP and on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// One result per command envelope received, on `keyledger.command-results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandResult {
    pub command_id: Uuid,
    pub account_id: String,
    pub status: CommandStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Uuid>,
    /// Base64 libsodium sealed box of the new key, to the command's `reply_public_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_api_key: Option<String>,
    #[serde(default)]
    pub event_sequences: Vec<u64>,
}

/// What could not be parsed, and why, on `keyledger.dead-letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    pub reason: String,
    /// Base64 of the raw value.
    pub original: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One email to send, on `keyledger.notifications`: one per (event, recipient).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Notification {
    /// UUIDv5 of the event id and the recipient: the idempotency key of this email.
    pub notification_id: Uuid,
    /// The ExpiryReminderDue or KeyExpired event that caused it.
    pub event_id: Uuid,
    pub account_id: String,
    pub key_id: Uuid,
    pub to: String,
    pub subject: String,
    /// Plain text.
    pub body: String,
    /// `expiry_reminder` or `key_expired`.
    pub kind: String,
    /// The reminder stage (days before expiry); absent on an expiry notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
}

impl Notification {
    /// The idempotency key of the email to `to` caused by event `event_id`.
    pub fn id_for(event_id: Uuid, to: &str) -> Uuid {
        Uuid::new_v5(&event_id, to.as_bytes())
    }
}
