//! # keyledger
//!
//! An event-sourced service for the whole life of API keys: generate, list, update
//! contacts, rotate, revoke, expire, migrate legacy keys, verify. Commands are decided by
//! the [`keyring::Keyring`] aggregate (one per account), stored as immutable events
//! (PostgreSQL, or SQLite when embedded), and folded into read models (the Settings listing
//! and the verification index). See `docs/ARCHITECTURE.md`.

pub mod app;
pub mod audit;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod config;
pub mod domain;
pub mod drill;
pub mod feed;
pub mod handler;
pub mod http;
pub mod keyring;
pub mod metrics;
pub mod notify;
#[cfg(test)]
mod properties;
pub mod read_side;
pub mod reminders;
pub mod store;
pub mod telemetry;
