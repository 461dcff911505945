//! The bus: the parts of keyledger that talk to Kafka, one file per role (the plumbing
//! they share is in `kafka/`).
//!
//! - [`relay`] publishes every committed event from the PostgreSQL outbox to the events
//!   topic, in per-account order, with the account's hash-chain value.
//! - [`commands`] consumes command envelopes, hands them to the command handler, and
//!   publishes one result per envelope (or a dead letter for what cannot be parsed).
//! - [`projector`] builds the listing table and the persisted verification index from the
//!   events topic.
//! - [`follower`] keeps each instance's in-memory verification index current from it.

pub mod commands;
pub mod follower;
pub mod projector;
pub mod relay;
