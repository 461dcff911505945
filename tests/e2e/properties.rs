//! Bad input at scale: property tests of everything that parses what callers send — the
//! command envelope of the bus, the commands the keyring decides, and presented keys in
//! verify. Thousands of generated cases each: no panic, and every refusal a typed error
//! with a stable code and a message. `PROPTEST_CASES` sets the budget.

use chrono::{TimeZone, Utc};
use keyledger_events::{Command, CommandEnvelope, KeyGenerated, KeyringEvent};
use proptest::prelude::*;
use uuid::Uuid;

use keyledger::domain::seal;
use keyledger::domain::{mint_key, AccountId, KeyHasher, LoginEmail, Policy};
use keyledger::keyring::{Keyring, KeyringCommand, NewKeyMaterial};
use keyledger::read_side::{ReadSide, Rejection};

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that look like what a careless or hostile sender puts in a field.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "[a-z0-9._%+-]{0,70}@[a-z0-9.-]{0,70}",
        "[ \\t\\n\\x00-\\x1f]{0,8}[a-zA-Z]{0,300}",
        Just(String::new()),
        Just("a".repeat(300)),
        Just("john.doe@agency.gov.sg".to_owned()),
        Just("ops@agency.gov.sg".to_owned()),
        Just("\u{202e}evil@agency.gov.sg".to_owned()),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let uuid = any::<u128>().prop_map(Uuid::from_u128);
    prop_oneof![
        (nasty(), prop::collection::vec(nasty(), 0..25), nasty()).prop_map(
            |(label, contacts, login_email)| Command::GenerateKey {
                label,
                contacts,
                login_email
            }
        ),
        (uuid.clone(), prop::collection::vec(nasty(), 0..25))
            .prop_map(|(key_id, contacts)| Command::UpdateContacts { key_id, contacts }),
        uuid.clone()
            .prop_map(|key_id| Command::RevokeKey { key_id }),
        (uuid.clone(), nasty(), any::<Option<i64>>()).prop_map(|(key_id, label, grace_seconds)| {
            Command::RotateKey {
                key_id,
                label,
                grace_seconds,
            }
        }),
        uuid.clone()
            .prop_map(|key_id| Command::ExpireKey { key_id }),
        (
            uuid,
            any::<u32>(),
            prop::collection::vec(any::<u32>(), 0..5)
        )
            .prop_map(|(key_id, stage, skipping)| Command::SendExpiryReminder {
                key_id,
                stage,
                skipping
            }),
        (nasty(), nasty()).prop_map(|(login_email, legacy_hash)| Command::MigrateLegacyKey {
            login_email,
            legacy_hash,
            created_at: None,
        }),
    ]
}

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 0, 0, 0)
        .single()
        .expect("valid")
}

/// A keyring with one live key (id 1), so commands naming it get past "not found".
fn keyring() -> Keyring {
    use cqrs_es::Aggregate;
    let mut k = Keyring::default();
    k.apply(keyledger::keyring::StoredEvent(KeyringEvent::KeyGenerated(
        KeyGenerated {
            command_id: Uuid::nil(),
            key_id: Uuid::from_u128(1),
            label: "prod".into(),
            last_five: "abcde".into(),
            key_hash: "00".repeat(32),
            hash_scheme: keyledger_events::HASH_SCHEME_BLAKE3.into(),
            contacts: vec!["ops@agency.gov.sg".into()],
            login_email: "john.doe@agency.gov.sg".into(),
            created_at: t0(),
            expires_at: Policy::default().expiry_for(t0()),
            rotated_from: None,
        },
    )));
    k
}

/// Decides `command` as the handler would (material minted for the parsed login email).
fn decide(keyring: &Keyring, command: Command) {
    let username = match &command {
        Command::GenerateKey { login_email, .. } => LoginEmail::parse(login_email).ok(),
        _ => LoginEmail::parse("john.doe@agency.gov.sg").ok(),
    }
    .map(|l| l.username())
    .unwrap_or_default();
    let cmd = KeyringCommand {
        command_id: Uuid::from_u128(99),
        command,
        material: Some(NewKeyMaterial {
            key_id: Uuid::from_u128(2),
            username,
            key_hash: "11".repeat(32),
            last_five: "vwxyz".into(),
        }),
    };
    for now in [
        t0(),
        t0() + chrono::Duration::days(170),
        t0() + chrono::Duration::days(400),
    ] {
        if let Err(e) = keyring.decide(&cmd, now, &Policy::default()) {
            assert!(!e.code().is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Arbitrary bytes: parsed or refused, never a panic.
    #[test]
    fn envelope_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(env) = serde_json::from_slice::<CommandEnvelope>(&raw) {
            let _ = AccountId::parse(&env.account_id);
            let _ = seal::parse_public_key(env.reply_public_key.as_deref());
            decide(&keyring(), env.command);
        }
    }

    /// Well-formed envelopes with hostile field values: every refusal typed.
    #[test]
    fn hostile_envelopes_get_typed_refusals(
        account in nasty(),
        command in command(),
        reply in proptest::option::of(nasty()),
    ) {
        let env = CommandEnvelope {
            command_id: Uuid::from_u128(7),
            account_id: account,
            issued_by: None,
            command,
            reply_public_key: reply,
        };
        // Through the wire format and back, as the consumer sees it.
        let bytes = serde_json::to_vec(&env).expect("serialises");
        let parsed: CommandEnvelope = serde_json::from_slice(&bytes).expect("round trip");
        prop_assert_eq!(&parsed, &env);
        if let Err(e) = AccountId::parse(&parsed.account_id) {
            prop_assert!(!e.to_string().is_empty());
        }
        if let Err(e) = seal::parse_public_key(parsed.reply_public_key.as_deref()) {
            prop_assert!(!e.to_string().is_empty());
        }
        decide(&keyring(), parsed.command);
    }

    /// Presented keys: anything that is not the key is refused as malformed or unknown,
    /// never a panic, never a match.
    #[test]
    fn verify_refuses_everything_but_the_key(presented in prop_oneof![
        ".*",
        "[a-z]{1,20}_v1_[A-Za-z0-9+/=]{0,60}",
        "[a-z]{1,20}_v[0-9]_.{0,80}",
    ]) {
        let hasher = KeyHasher::new(b"property-test-pepper-0123456789abcdef");
        let read_side = ReadSide::new(hasher.clone(), None);
        let minted = mint_key("johndoe", &hasher);
        read_side.apply_in_memory("acc", 1, &KeyringEvent::KeyGenerated(KeyGenerated {
            command_id: Uuid::nil(),
            key_id: Uuid::from_u128(1),
            label: "prod".into(),
            last_five: minted.last_five.clone(),
            key_hash: minted.key_hash.clone(),
            hash_scheme: keyledger_events::HASH_SCHEME_BLAKE3.into(),
            contacts: vec![],
            login_email: "john.doe@agency.gov.sg".into(),
            created_at: t0(),
            expires_at: Policy::default().expiry_for(t0()),
            rotated_from: None,
        }));
        let verdict = read_side.verify(&presented, Some(&presented), t0());
        if presented == minted.plaintext.expose() {
            prop_assert!(verdict.is_ok());
        } else {
            let refused = verdict.expect_err("only the key verifies");
            prop_assert!(matches!(refused, Rejection::Malformed | Rejection::Unknown));
        }
        // The real key with arbitrary trailing or leading noise is refused too.
        let noisy = format!("{}{}", minted.plaintext.expose(), presented);
        if !presented.is_empty() {
            prop_assert!(read_side.verify(&noisy, None, t0()).is_err());
        }
        prop_assert!(read_side.verify(minted.plaintext.expose(), None, t0()).is_ok());
    }
}
