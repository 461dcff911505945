//! The performance picture: load tools that measure keyledger next to the bare parts it is
//! built on (the database, the broker, an HTTP endpoint that does nothing), so every figure
//! comes with the ceiling it should be read against. `scripts/bench-all` runs them all.
//!
//! - [`bus`]: GenerateKey over the bus next to raw commits and the raw broker; the audit
//!   replay next to a bare consumer.
//! - [`http`]: verification over HTTP next to a bare endpoint of the same server.
//! - [`restart`]: time from start to ready, and memory, with a large store.
//! - [`history`]: the listing `as_of` an instant and a key's history next to the plain
//!   listing; how fast a revocation on one instance is refused on another.
//! - [`scan`]: `keyledger scan` on plain text next to `grep -c`.

pub mod bus;
pub mod history;
pub mod http;
pub mod restart;
pub mod scan;

/// The `p` quantile (0..=1) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The body of a GenerateKey request the load tools send over HTTP.
pub fn generate_body(label: &str) -> serde_json::Value {
    serde_json::json!({"label": label, "contacts": ["ops@agency.gov.sg"], "login_email": "bench@agency.gov.sg"})
}

/// The `i`-th synthetic key of a benchmark store: 20 keys per account (`acct-0000000`, …),
/// valid for 180 days from `now`, its hash made with `hasher`. Returns the account, the
/// event's sequence in it, and the event.
pub fn synthetic_key(
    hasher: &keyledger::domain::KeyHasher,
    i: usize,
    now: chrono::DateTime<chrono::Utc>,
) -> (String, u64, keyledger_events::KeyringEvent) {
    use keyledger_events::{KeyGenerated, KeyringEvent, HASH_SCHEME_BLAKE3};
    let (account, sequence) = (format!("acct-{:07}", i / 20), (i % 20 + 1) as u64);
    let key_id = uuid::Uuid::now_v7();
    let event = KeyringEvent::KeyGenerated(KeyGenerated {
        command_id: key_id,
        key_id,
        label: format!("key {sequence}"),
        last_five: "abcde".into(),
        key_hash: hasher.hash_hex(&format!("bench{i}")),
        hash_scheme: HASH_SCHEME_BLAKE3.into(),
        contacts: vec!["ops@agency.gov.sg".into()],
        login_email: "bench@agency.gov.sg".into(),
        created_at: now,
        expires_at: now + chrono::Duration::days(180),
        rotated_from: None,
    });
    (account, sequence, event)
}
