//! The hash chain of an account's events: computed when events are written (kept in each
//! event's metadata), carried on the events topic, verified by the audit.
//!
//! `chain(n) = BLAKE3(chain(n-1) ‖ canonical(event n))`, with 32 zero bytes before the first
//! event. The canonical bytes are the compact JSON of `{account_id, sequence, event_type,
//! event_version, payload}` in that field order (serde serialises struct fields in
//! declaration order and the payload's own fields likewise), so any auditor holding the log
//! can recompute it; a changed, removed or reordered event breaks every later value.

use serde::Serialize;

use crate::KeyringEvent;

#[derive(Serialize)]
struct Canonical<'a> {
    account_id: &'a str,
    sequence: u64,
    event_type: &'a str,
    event_version: &'a str,
    payload: &'a KeyringEvent,
}

/// The chain value before an account's first event.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// The canonical bytes of one event.
pub fn canonical_bytes(account_id: &str, sequence: u64, event: &KeyringEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write_canonical(&mut out, account_id, sequence, event);
    out
}

fn write_canonical(out: &mut Vec<u8>, account_id: &str, sequence: u64, event: &KeyringEvent) {
    // Serialising plain structs, strings, numbers and RFC 3339 times into a Vec cannot fail.
    let _ = serde_json::to_writer(
        out,
        &Canonical {
            account_id,
            sequence,
            event_type: event.event_type(),
            event_version: crate::EVENT_VERSION,
            payload: event,
        },
    );
}

/// The next chain value.
pub fn next(
    previous: &[u8; 32],
    account_id: &str,
    sequence: u64,
    event: &KeyringEvent,
) -> [u8; 32] {
    next_with(
        &mut Vec::with_capacity(512),
        previous,
        account_id,
        sequence,
        event,
    )
}

/// [`next`], with a buffer the caller keeps between calls (a replay of millions of events
/// then allocates nothing here).
pub fn next_with(
    buffer: &mut Vec<u8>,
    previous: &[u8; 32],
    account_id: &str,
    sequence: u64,
    event: &KeyringEvent,
) -> [u8; 32] {
    buffer.clear();
    write_canonical(buffer, account_id, sequence, event);
    let mut h = blake3::Hasher::new();
    h.update(previous);
    h.update(buffer);
    *h.finalize().as_bytes()
}

/// Metadata keys: the chain values of a commit's events (hex, comma-separated, in order)
/// and the sequence of its first event.
pub const METADATA_CHAINS: &str = "chain";
pub const METADATA_FIRST_SEQUENCE: &str = "first_sequence";

/// The metadata recording `chains` for a commit whose first event is `first_sequence`.
pub fn metadata(first_sequence: u64, chains: &[[u8; 32]]) -> [(String, String); 2] {
    let list: Vec<String> = chains.iter().map(to_hex).collect();
    [
        (METADATA_CHAINS.to_owned(), list.join(",")),
        (
            METADATA_FIRST_SEQUENCE.to_owned(),
            first_sequence.to_string(),
        ),
    ]
}

/// Metadata key: the commit's signatures (base64, comma-separated, in order).
pub const METADATA_SIGNATURES: &str = "signature";

/// The chain value recorded for `sequence` in its commit's metadata.
pub fn recorded(
    metadata: &std::collections::HashMap<String, String>,
    sequence: u64,
) -> Option<[u8; 32]> {
    recorded_item(metadata, METADATA_CHAINS, sequence).and_then(from_hex)
}

/// The signature recorded for `sequence` in its commit's metadata.
pub fn recorded_signature(
    metadata: &std::collections::HashMap<String, String>,
    sequence: u64,
) -> Option<&str> {
    recorded_item(metadata, METADATA_SIGNATURES, sequence)
}

/// Item `sequence` of a comma-separated per-event list of a commit's metadata.
fn recorded_item<'m>(
    metadata: &'m std::collections::HashMap<String, String>,
    key: &str,
    sequence: u64,
) -> Option<&'m str> {
    let first: u64 = metadata.get(METADATA_FIRST_SEQUENCE)?.parse().ok()?;
    let index = sequence.checked_sub(first)? as usize;
    metadata.get(key)?.split(',').nth(index)
}

/// Lower-case hex of a chain value.
pub fn to_hex(b: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for byte in b {
        s.push(DIGITS[(byte >> 4) as usize] as char);
        s.push(DIGITS[(byte & 15) as usize] as char);
    }
    s
}

/// A chain value from its hex (64 digits, either case).
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyRevoked;
    use uuid::Uuid;

    #[test]
    fn chain_depends_on_order_and_content() {
        let e = |n: u128| {
            KeyringEvent::KeyRevoked(KeyRevoked {
                command_id: Uuid::from_u128(n),
                key_id: Uuid::from_u128(n),
                revoked_at: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                cause: None,
                source: None,
                ..Default::default()
            })
        };
        let a = next(&next(&GENESIS, "acc", 1, &e(1)), "acc", 2, &e(2));
        let b = next(&next(&GENESIS, "acc", 1, &e(2)), "acc", 2, &e(1));
        assert_ne!(a, b);
        assert_eq!(a, next(&next(&GENESIS, "acc", 1, &e(1)), "acc", 2, &e(2)));
        assert_eq!(from_hex(&to_hex(&a)), Some(a));
    }
}
