//! Envelopes of the bus: how events, command results and dead letters travel on Kafka.
//!
//! These are the JSON objects of `CONTRACT.md`. The event envelope wraps one stored event
//! with its place in the account's stream and the account's hash-chain value.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{chain, KeyringEvent, EVENT_VERSION};

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
    /// The account's chain value before this event (hex; 64 zeros before the first), so a
    /// reader can check `chain` against the payload without any state of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_chain: Option<String>,
    /// Base64 Ed25519 signature over the 32 bytes of `chain` (see [`crate::signature`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Who issued the command: a token's name, `saga`, or `bus:<issued_by>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub payload: serde_json::Value,
}

/// Namespace of derived event ids: `event_id = UUIDv5(ns, "{account}/{sequence}")`, so a
/// republished event is byte-identical and anyone can check an id.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b65796c_6564_6765_7200_6576656e7473);

impl EventEnvelope {
    /// The id of event `sequence` of `account_id`.
    pub fn event_id_for(account_id: &str, sequence: u64) -> Uuid {
        Uuid::new_v5(
            &EVENT_ID_NAMESPACE,
            format!("{account_id}/{sequence}").as_bytes(),
        )
    }

    /// The envelope of a stored event with its chain value (and the one before it).
    pub fn of(
        account_id: &str,
        sequence: u64,
        event: &KeyringEvent,
        previous: &[u8; 32],
        chain: &[u8; 32],
    ) -> Self {
        Self {
            event_id: Self::event_id_for(account_id, sequence),
            account_id: account_id.to_owned(),
            sequence,
            event_type: event.event_type().to_owned(),
            event_version: EVENT_VERSION.to_owned(),
            occurred_at: event.occurred_at(),
            command_id: event.command_id(),
            chain: chain::to_hex(chain),
            previous_chain: Some(chain::to_hex(previous)),
            signature: None,
            actor: None,
            payload: event.payload(),
        }
    }
}

/// An event read back from the events topic: where it stands and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub event_id: Uuid,
    pub account_id: String,
    pub sequence: u64,
    /// The chain value the envelope carries (hex), not yet checked.
    pub chain: String,
    /// The chain value before it, when carried (hex).
    pub previous_chain: Option<String>,
    /// The carried signature (base64), not yet checked.
    pub signature: Option<String>,
    pub actor: Option<String>,
    pub event: KeyringEvent,
}

/// Why a record is not vouched for by the log's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsigned {
    #[error("it carries no signature")]
    Missing,
    #[error("its chain value does not follow from its payload and previous chain value")]
    Chain,
    #[error("its signature does not verify under the log's key")]
    Signature,
}

impl DecodedEvent {
    /// Whether the record is one keyledger wrote: `chain` recomputes from `previous_chain`
    /// and the payload, and `signature` signs `chain` under one of `keys`. Needs no state: a
    /// forger would have to find a payload and previous value hashing to a value keyledger
    /// signed.
    pub fn vouched_for(&self, keys: &crate::signature::LogKeys) -> Result<(), Unsigned> {
        let (carried, signature) = self.chain_holds()?;
        if !keys.verifies(&carried, signature) {
            return Err(Unsigned::Signature);
        }
        Ok(())
    }

    /// The first half of [`Self::vouched_for`]: the carried chain value recomputes from
    /// `previous_chain` and the payload. Returns it with the signature still to check (a
    /// caller that has seen this exact pair verify may skip the second half; never this
    /// one, which binds the pair to this payload).
    pub fn chain_holds(&self) -> Result<([u8; 32], &str), Unsigned> {
        let (Some(previous), Some(signature)) = (&self.previous_chain, &self.signature) else {
            return Err(Unsigned::Missing);
        };
        let previous = chain::from_hex(previous).ok_or(Unsigned::Chain)?;
        let carried = chain::from_hex(&self.chain).ok_or(Unsigned::Chain)?;
        if chain::next(&previous, &self.account_id, self.sequence, &self.event) != carried {
            return Err(Unsigned::Chain);
        }
        Ok((carried, signature))
    }
}

/// Why a record of the events topic is not an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not an event envelope: {0}")]
    Envelope(serde_json::Error),
    #[error("unsupported event version {0} (this reader knows {EVENT_VERSION})")]
    Version(String),
    #[error("unreadable {event_type} payload: {source}")]
    Payload {
        event_type: String,
        source: serde_json::Error,
    },
    #[error("event id {found} is not the one derived from {account_id}/{sequence}")]
    EventId {
        found: Uuid,
        account_id: String,
        sequence: u64,
    },
}

/// The envelope as read, borrowing from the record (no intermediate JSON tree).
#[derive(Deserialize)]
struct EnvelopeRef<'a> {
    event_id: Uuid,
    #[serde(borrow)]
    account_id: Cow<'a, str>,
    sequence: u64,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    event_version: Cow<'a, str>,
    #[serde(borrow)]
    chain: Cow<'a, str>,
    #[serde(default, borrow)]
    previous_chain: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    signature: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    actor: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
}

/// Decodes one record of the events topic, checking its version and its derived event id.
pub fn decode_event(bytes: &[u8]) -> Result<DecodedEvent, DecodeError> {
    let e: EnvelopeRef<'_> = serde_json::from_slice(bytes).map_err(DecodeError::Envelope)?;
    if e.event_version != EVENT_VERSION {
        return Err(DecodeError::Version(e.event_version.into_owned()));
    }
    let event = KeyringEvent::from_payload(&e.event_type, e.payload.get()).map_err(|source| {
        DecodeError::Payload {
            event_type: e.event_type.to_string(),
            source,
        }
    })?;
    if e.event_id != EventEnvelope::event_id_for(&e.account_id, e.sequence) {
        return Err(DecodeError::EventId {
            found: e.event_id,
            account_id: e.account_id.into_owned(),
            sequence: e.sequence,
        });
    }
    Ok(DecodedEvent {
        event_id: e.event_id,
        account_id: e.account_id.into_owned(),
        sequence: e.sequence,
        chain: e.chain.into_owned(),
        previous_chain: e.previous_chain.map(Cow::into_owned),
        signature: e.signature.map(Cow::into_owned),
        actor: e.actor.map(Cow::into_owned),
        event,
    })
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
    /// For a ReportLeak: what became of each key, in the order given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<LeakResult>>,
}

/// What a leak report did with one key (the answer of `POST /v1/leaks` and of ReportLeak).
/// Names no account, label or contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeakResult {
    /// The key's last five characters (empty when the string was too short to have them).
    pub last_five: String,
    pub result: LeakOutcome,
}

impl LeakResult {
    /// The result for the reported string `raw`, named by its last five characters.
    pub fn of(raw: &str, result: LeakOutcome) -> Self {
        Self {
            last_five: last_five(raw),
            result,
        }
    }
}

/// The last five characters of `raw` (trimmed): all a leak report ever repeats of a key.
pub fn last_five(raw: &str) -> String {
    let chars: Vec<char> = raw.trim().chars().collect();
    chars[chars.len().saturating_sub(5)..].iter().collect()
}

/// `revoked` (it was live: revoked now), `already_inactive` (revoked or expired before),
/// `unknown` (key-shaped, but no key of keyledger's), `malformed` (not key-shaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeakOutcome {
    Revoked,
    AlreadyInactive,
    Unknown,
    Malformed,
}

impl LeakOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakOutcome::Revoked => "revoked",
            LeakOutcome::AlreadyInactive => "already_inactive",
            LeakOutcome::Unknown => "unknown",
            LeakOutcome::Malformed => "malformed",
        }
    }
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
    /// The ExpiryReminderDue, KeyExpired or KeyRevoked (leaked) event that caused it.
    pub event_id: Uuid,
    pub account_id: String,
    pub key_id: Uuid,
    pub to: String,
    pub subject: String,
    /// Plain text.
    pub body: String,
    /// `expiry_reminder`, `key_expired` or `key_leaked`.
    pub kind: String,
    /// A reminder's stage (days before expiry, a number), `"leaked"` on a leak notice;
    /// absent on an expiry notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<NotificationStage>,
}

/// The `stage` of a notification: a number of days for a reminder, a word otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum NotificationStage {
    /// A reminder, this many days before expiry.
    Days(u32),
    /// A notice that is no reminder (`"leaked"`).
    Word(StageWord),
}

/// The stages that are words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StageWord {
    /// The key was reported leaked and has been revoked.
    Leaked,
}

impl NotificationStage {
    /// The reminder stage in days, if this is one.
    pub fn days(self) -> Option<u32> {
        match self {
            NotificationStage::Days(d) => Some(d),
            NotificationStage::Word(_) => None,
        }
    }
}

impl Notification {
    /// The idempotency key of the email to `to` caused by event `event_id`.
    pub fn id_for(event_id: Uuid, to: &str) -> Uuid {
        Uuid::new_v5(&event_id, to.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyRevoked;

    fn revoked() -> KeyringEvent {
        KeyringEvent::KeyRevoked(KeyRevoked {
            command_id: Uuid::from_u128(7),
            key_id: Uuid::from_u128(8),
            revoked_at: DateTime::<Utc>::UNIX_EPOCH,
            cause: None,
            source: None,
            ..Default::default()
        })
    }

    #[test]
    fn an_envelope_decodes_back_to_its_event() {
        let value = chain::next(&chain::GENESIS, "acc", 3, &revoked());
        let envelope = EventEnvelope::of("acc", 3, &revoked(), &chain::GENESIS, &value);
        let bytes = serde_json::to_vec(&envelope).expect("json");
        let decoded = decode_event(&bytes).expect("decodes");
        assert_eq!(decoded.event, revoked());
        assert_eq!((decoded.account_id.as_str(), decoded.sequence), ("acc", 3));
        assert_eq!(decoded.chain, chain::to_hex(&value));
        assert_eq!(decoded.event_id, EventEnvelope::event_id_for("acc", 3));
    }

    #[test]
    fn a_wrong_version_type_or_id_is_named() {
        let envelope = EventEnvelope::of("acc", 1, &revoked(), &chain::GENESIS, &chain::GENESIS);
        let mut v = serde_json::to_value(&envelope).expect("json");
        v["event_version"] = "2".into();
        assert!(matches!(
            decode_event(v.to_string().as_bytes()),
            Err(DecodeError::Version(_))
        ));
        let mut v = serde_json::to_value(&envelope).expect("json");
        v["event_type"] = "KeyGenerated".into();
        assert!(matches!(
            decode_event(v.to_string().as_bytes()),
            Err(DecodeError::Payload { .. })
        ));
        let mut v = serde_json::to_value(&envelope).expect("json");
        v["sequence"] = 2.into();
        assert!(matches!(
            decode_event(v.to_string().as_bytes()),
            Err(DecodeError::EventId { .. })
        ));
        assert!(matches!(
            decode_event(b"{not json"),
            Err(DecodeError::Envelope(_))
        ));
    }
}
