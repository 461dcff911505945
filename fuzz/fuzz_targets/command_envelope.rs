//! A record of the commands topic, as the command consumer reads it: any bytes end as a
//! dead letter, a refusal with a code, or a request for the handler — never a panic.
#![no_main]

use keyledger::bus::commands::{admit, Admission};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match admit(data, 1 << 20) {
        Admission::Dead(reason) => assert!(!reason.is_empty()),
        Admission::Refused { code, .. } => assert!(!code.is_empty()),
        Admission::Admitted { envelope, request } => {
            assert_eq!(request.command_id, envelope.command_id);
            assert_eq!(request.account_id.as_str(), envelope.account_id);
        }
    }
});
