//! A presented key (the body of every verify): parses or is malformed, never panics; what
//! parses is exactly its parts. And any text redacted (error messages, dead letters, a
//! leak report's source) keeps nothing shaped like a key, never panics.
#![no_main]

use keyledger::domain::api_key::{contains_key_shaped, redact_keys};
use keyledger::domain::PresentedKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = PresentedKey::parse(text) {
        assert_eq!(key.as_str(), text);
        assert_eq!(
            format!("{}_v1_{}", key.username(), key.secret()),
            text,
            "a parsed key is exactly its parts"
        );
    }
    let redacted = redact_keys(text);
    assert!(!contains_key_shaped(redacted.as_bytes()), "a key survived redaction");
});
