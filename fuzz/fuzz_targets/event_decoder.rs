//! A record of the events topic, as every consumer and the audit decode it: an event or a
//! typed error, never a panic; a decoded event's id is the one derived from its place.
#![no_main]

use keyledger_events::{decode_event, EventEnvelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = decode_event(data) {
        assert_eq!(
            decoded.event_id,
            EventEnvelope::event_id_for(&decoded.account_id, decoded.sequence)
        );
    }
});
