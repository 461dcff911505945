//! # keyledger
//!
//! An event-sourced service for the whole life of API keys: generate, list, update
//! contacts, rotate, revoke, expire, migrate legacy keys, verify. Commands are decided by
//! the [`keyring::Keyring`] aggregate (one per account), stored as immutable events
//! (PostgreSQL, or SQLite when embedded), and folded into read models (the Settings listing
//! and the verification index). See `docs/ARCHITECTURE.md`.
//!
//! The layout, one job per module, in layers: a module uses its own layer and those below,
//! never one above.
//!
//! | layer | module | its one job |
//! | --- | --- | --- |
//! | 1 | [`domain`] | values that parse on construction: account ids, labels, emails, keys, the clock, the policy |
//! | 1 | [`keyring`] | the aggregate: decides commands, applies events (pure) |
//! | 2 | [`store`] | the event store and the tables beside it: ordered reads, transactions, checkpoints, offsets, index snapshots, key usage |
//! | 2 | [`tokens`] | scoped API tokens: the tokens file, roles, constant-time lookup |
//! | 2 | [`kafka`] | Kafka plumbing: settings, topics, idempotent producer, consumer groups with offsets in PostgreSQL, halts |
//! | 3 | [`projection`] | the one way events reach a consumer: the `Projection` trait, fed from the store or the events topic |
//! | 3 | [`read_side`] | the in-memory verification index, the listing table and the persisted index; the listing at an instant and a key's history, folded from the log; usage counted by verify and flushed |
//! | 3 | [`reminders`] | the reminder schedule (a projection) and the saga that fires it |
//! | 3 | [`notify`] | the notifier: outbox (a projection), notifications topic, SMTP |
//! | 4 | [`handler`] | the one writer path: load, dedupe, mint, decide, commit, feed the read side |
//! | 5 | [`bus`] | the bus's roles: relay, command consumer, projector, index follower |
//! | 5 | [`http`] | the HTTP API |
//! | 5 | [`cli`] | the operator's command line (`keys` and `reminders` are HTTP clients) |
//! | 5 | [`audit`] | `keyledger audit`: replays the log and proves what happened |
//! | 5 | [`rotation`] | ends a first-use rotation when its successor is first verified |
//! | 5 | [`leaks`] | the leak desk: revokes reported keys and has their contacts told |
//! | 6 | [`app`] | assembles and runs the service from [`config`] |
//! | — | [`config`], [`metrics`], [`telemetry`] | settings, Prometheus metrics, logs (used at every layer) |
//!
//! The reminder saga's firing (in [`reminders`]) issues commands through its `Issuer` trait,
//! which the [`handler`] implements from the layer above (no upward import); [`app`] starts
//! it like a layer-5 role. The wire contract (commands, events,
//! envelopes, the hash chain) is the `keyledger-events` crate; the read models as pure folds
//! are `keyledger-projections`; load tools are `keyledger-tools`, outside this binary.

pub mod app;
pub mod audit;
pub mod bus;
pub mod cli;
pub mod config;
pub mod domain;
pub mod handler;
pub mod http;
pub mod kafka;
pub mod keyring;
pub mod leaks;
pub mod metrics;
pub mod notify;
pub mod projection;
pub mod read_side;
pub mod reminders;
pub mod rotation;
pub mod store;
pub mod telemetry;
pub mod tokens;
