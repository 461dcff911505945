//! One line of a legacy export (CSV or JSON lines), read and validated the way
//! `keyledger migrate-legacy` does: a row or a message, never a panic.
#![no_main]

use keyledger::cli::legacy::{parse_line, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    for jsonl in [false, true] {
        if let Ok(row) = parse_line(line, jsonl) {
            let _ = validate(&row, now);
        }
    }
});
