//! JSON Schemas of the contract, generated from the Rust types.
//!
//! The checked-in copies under `events/schemas/` are what other teams read; the test below
//! fails when they drift from the types. Regenerate them with
//! `KEYLEDGER_UPDATE_SCHEMAS=1 cargo test -p keyledger-events`.

use crate::{
    CommandEnvelope, CommandResult, DeadLetter, EventEnvelope, KeyringEvent, Notification,
};

/// Every schema of the contract: (file name, pretty JSON).
pub fn all() -> Vec<(&'static str, String)> {
    fn pretty(s: schemars::Schema) -> String {
        let mut out = serde_json::to_string_pretty(&s).unwrap_or_default();
        out.push('\n');
        out
    }
    vec![
        (
            "command-envelope.schema.json",
            pretty(schemars::schema_for!(CommandEnvelope)),
        ),
        (
            "keyring-event.schema.json",
            pretty(schemars::schema_for!(KeyringEvent)),
        ),
        (
            "event-envelope.schema.json",
            pretty(schemars::schema_for!(EventEnvelope)),
        ),
        (
            "command-result.schema.json",
            pretty(schemars::schema_for!(CommandResult)),
        ),
        (
            "dead-letter.schema.json",
            pretty(schemars::schema_for!(DeadLetter)),
        ),
        (
            "notification.schema.json",
            pretty(schemars::schema_for!(Notification)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn checked_in_schemas_match_the_types() {
        // The runtime value: a target folder shared between checkouts may hold a binary
        // compiled in another one.
        let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
        let dir = PathBuf::from(root).join("schemas");
        let update = std::env::var_os("KEYLEDGER_UPDATE_SCHEMAS").is_some();
        let mut drifted = Vec::new();
        for (name, generated) in super::all() {
            let path = dir.join(name);
            if update {
                std::fs::write(&path, &generated).expect("write schema");
                continue;
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            if on_disk != generated {
                drifted.push(name);
            }
        }
        assert!(
            drifted.is_empty(),
            "schemas out of date: {drifted:?}; run KEYLEDGER_UPDATE_SCHEMAS=1 cargo test -p keyledger-events"
        );
    }
}
