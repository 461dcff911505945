//! # keyledger-events: the wire contract
//!
//! Everything another service, an auditor or an operator depends on lives here and nowhere
//! else: the commands keyledger accepts, the events it records, and the envelopes both travel
//! in. The types know nothing of Kafka, SQL or HTTP; they are plain serde structs with
//! explicit, stable field names, versioned, and described by JSON Schemas checked in under
//! `events/schemas/` (a test fails when the types and the schemas drift apart).
//!
//! An independent auditor needs only this crate: [`decode_event`] reads a record of the
//! events topic (checking its version and derived event id), [`chain`] recomputes the
//! account's hash chain, and [`signature`] checks the log's signatures with nothing secret.
//!
//! Rules for changing this crate: add fields freely (readers ignore what they don't know),
//! never rename or remove one without a new event version.

pub mod chain;
mod command;
mod envelope;
mod event;
pub mod schema;
pub mod signature;

pub use command::{Command, CommandEnvelope, CommandType, LeakedKeys};
pub use envelope::{
    decode_event, CommandResult, CommandStatus, DeadLetter, DecodeError, DecodedEvent, ErrorBody,
    EventEnvelope, LeakOutcome, LeakResult, Notification, NotificationStage, StageWord, Unsigned,
    EVENT_ID_NAMESPACE,
};
pub use event::{
    ContactsUpdated, ExpiryReminderDue, KeyExpired, KeyGenerated, KeyRevoked, KeyRotated,
    KeyringEvent, LegacyKeyMigrated, RevokeCause, EVENT_VERSION,
};

/// The hashing scheme of keys issued by keyledger: keyed BLAKE3 over the whole key.
pub const HASH_SCHEME_BLAKE3: &str = "blake3-keyed-v1";
/// The hashing scheme of Postman's legacy keys: bcrypt of the secret under a fixed salt.
pub const HASH_SCHEME_LEGACY_BCRYPT: &str = "postman-bcrypt-v1";
