//! Given/when/then tests of every rule of the keyring (cqrs-es's TestFramework).

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use keyledger_events::{
    Command, ContactsUpdated, ExpiryReminderDue, KeyExpired, KeyGenerated, KeyRevoked, KeyRotated,
    KeyringEvent, LegacyKeyMigrated, HASH_SCHEME_BLAKE3, HASH_SCHEME_LEGACY_BCRYPT,
};
use uuid::Uuid;

use super::*;
use crate::domain::{ContactsError, LabelError, ManualClock, Policy};

const LOGIN: &str = "john.doe@agency.gov.sg";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 2, 0, 0)
        .single()
        .expect("valid time")
}

fn services_at(now: DateTime<Utc>, policy: Policy) -> KeyringServices {
    KeyringServices {
        clock: Arc::new(ManualClock::new(now)),
        policy,
    }
}

fn framework_at(now: DateTime<Utc>) -> TestFramework<Keyring> {
    TestFramework::with(services_at(now, Policy::default()))
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn material(key: u128) -> NewKeyMaterial {
    NewKeyMaterial {
        key_id: id(key),
        username: "johndoe".into(),
        key_hash: format!("{key:064x}"),
        last_five: format!("{:05}", key % 100_000),
    }
}

fn generate(cmd: u128, key: u128, label: &str, contacts: &[&str]) -> KeyringCommand {
    KeyringCommand {
        command_id: id(cmd),
        command: Command::GenerateKey {
            label: label.into(),
            contacts: contacts.iter().map(|c| c.to_string()).collect(),
            login_email: LOGIN.into(),
        },
        material: Some(material(key)),
    }
}

fn plain(cmd: u128, command: Command) -> KeyringCommand {
    KeyringCommand {
        command_id: id(cmd),
        command,
        material: None,
    }
}

fn generated(cmd: u128, key: u128, label: &str, at: DateTime<Utc>) -> StoredEvent {
    let m = material(key);
    StoredEvent(KeyringEvent::KeyGenerated(KeyGenerated {
        command_id: id(cmd),
        key_id: m.key_id,
        label: label.into(),
        last_five: m.last_five,
        key_hash: m.key_hash,
        hash_scheme: HASH_SCHEME_BLAKE3.into(),
        contacts: vec!["ops@agency.gov.sg".into()],
        login_email: LOGIN.into(),
        created_at: at,
        expires_at: Policy::default().expiry_for(at),
        rotated_from: None,
    }))
}

fn revoked(cmd: u128, key: u128, at: DateTime<Utc>) -> StoredEvent {
    StoredEvent(KeyringEvent::KeyRevoked(KeyRevoked {
        command_id: id(cmd),
        key_id: id(key),
        revoked_at: at,
        cause: None,
        source: None,
        ..Default::default()
    }))
}

async fn expect_error(given: Vec<StoredEvent>, when: KeyringCommand, error: KeyringError) {
    framework_at(t0())
        .given(given)
        .when_async(when)
        .await
        .then_expect_error(error);
}

#[tokio::test]
async fn generate_issues_a_key_valid_six_calendar_months() {
    let mut expected = generated(1, 10, "prod", t0());
    if let KeyringEvent::KeyGenerated(e) = &mut expected.0 {
        e.contacts = vec!["ops@agency.gov.sg".into(), "Jane@agency.gov.sg".into()];
        assert_eq!(
            e.expires_at,
            Utc.with_ymd_and_hms(2026, 7, 15, 2, 0, 0)
                .single()
                .expect("t")
        );
    }
    framework_at(t0())
        .given_no_previous_events()
        .when_async(generate(
            1,
            10,
            " prod ",
            &["ops@Agency.GOV.SG", " Jane@agency.gov.sg"],
        ))
        .await
        .then_expect_events(vec![expected]);
}

#[tokio::test]
async fn generate_rejects_bad_labels() {
    expect_error(
        vec![],
        generate(1, 10, "  ", &["a@x.gov.sg"]),
        KeyringError::InvalidLabel(LabelError::Empty),
    )
    .await;
    expect_error(
        vec![],
        generate(1, 10, &"x".repeat(256), &["a@x.gov.sg"]),
        KeyringError::InvalidLabel(LabelError::TooLong(256)),
    )
    .await;
}

#[tokio::test]
async fn labels_are_unique_in_the_account_but_free_again_after_revocation() {
    expect_error(
        vec![generated(1, 10, "prod", t0())],
        generate(2, 11, "prod", &["a@x.gov.sg"]),
        KeyringError::DuplicateLabel("prod".into()),
    )
    .await;
    let result = framework_at(t0())
        .given(vec![generated(1, 10, "prod", t0()), revoked(2, 10, t0())])
        .when_async(generate(3, 11, "prod", &["a@x.gov.sg"]))
        .await
        .inspect_result();
    assert!(matches!(
        result.as_deref(),
        Ok([StoredEvent(KeyringEvent::KeyGenerated(_))])
    ));
}

#[tokio::test]
async fn generate_rejects_bad_contacts() {
    expect_error(
        vec![],
        generate(1, 10, "p", &[]),
        KeyringError::InvalidContacts(ContactsError::Empty),
    )
    .await;
    let many: Vec<String> = (0..21).map(|i| format!("u{i}@x.gov.sg")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    expect_error(
        vec![],
        generate(1, 10, "p", &many),
        KeyringError::InvalidContacts(ContactsError::TooMany(21)),
    )
    .await;
    let result = framework_at(t0())
        .given_no_previous_events()
        .when_async(generate(1, 10, "p", &["a@x.gov.sg", "not-an-email"]))
        .await
        .inspect_result();
    assert!(matches!(
        result,
        Err(KeyringError::InvalidContacts(ContactsError::Invalid {
            index: 1,
            ..
        }))
    ));
    let result = framework_at(t0())
        .given_no_previous_events()
        .when_async(generate(1, 10, "p", &["a@x.gov.sg", "a@X.gov.sg"]))
        .await
        .inspect_result();
    assert!(matches!(
        result,
        Err(KeyringError::InvalidContacts(ContactsError::Duplicate {
            index: 1,
            ..
        }))
    ));
}

#[tokio::test]
async fn generate_rejects_a_bad_or_different_login_email() {
    let mut cmd = generate(1, 10, "p", &["a@x.gov.sg"]);
    if let Command::GenerateKey { login_email, .. } = &mut cmd.command {
        *login_email = "not an email".into();
    }
    let result = framework_at(t0())
        .given_no_previous_events()
        .when_async(cmd.clone())
        .await
        .inspect_result();
    assert!(matches!(result, Err(KeyringError::InvalidLoginEmail(_))));
    if let Command::GenerateKey { login_email, .. } = &mut cmd.command {
        *login_email = "john.doe@other.gov.sg".into();
    }
    expect_error(
        vec![generated(9, 9, "first", t0())],
        cmd,
        KeyringError::LoginEmailMismatch {
            recorded: LOGIN.into(),
        },
    )
    .await;
}

#[tokio::test]
async fn the_live_key_cap_counts_neither_revoked_nor_expired_keys() {
    let policy = Policy {
        max_live_keys: 2,
        ..Policy::default()
    };
    let fw = |now| TestFramework::<Keyring>::with(services_at(now, policy.clone()));
    fw(t0())
        .given(vec![
            generated(1, 10, "a", t0()),
            generated(2, 11, "b", t0()),
        ])
        .when_async(generate(3, 12, "c", &["a@x.gov.sg"]))
        .await
        .then_expect_error(KeyringError::KeyLimitReached { max: 2 });
    let ok = fw(t0())
        .given(vec![
            generated(1, 10, "a", t0()),
            generated(2, 11, "b", t0()),
            revoked(3, 10, t0()),
        ])
        .when_async(generate(4, 12, "c", &["a@x.gov.sg"]))
        .await
        .inspect_result();
    assert!(ok.is_ok());
    let later = t0() + Duration::days(200);
    let ok = fw(later)
        .given(vec![
            generated(1, 10, "a", t0()),
            generated(2, 11, "b", t0()),
        ])
        .when_async(generate(4, 12, "c", &["a@x.gov.sg"]))
        .await
        .inspect_result();
    assert!(ok.is_ok(), "expired keys do not count");
}

#[tokio::test]
async fn update_contacts_replaces_them() {
    framework_at(t0())
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(plain(
            2,
            Command::UpdateContacts {
                key_id: id(10),
                contacts: vec!["new@X.gov.sg".into()],
            },
        ))
        .await
        .then_expect_events(vec![StoredEvent(KeyringEvent::ContactsUpdated(
            ContactsUpdated {
                command_id: id(2),
                key_id: id(10),
                contacts: vec!["new@x.gov.sg".into()],
                updated_at: t0(),
            },
        ))]);
}

#[tokio::test]
async fn commands_on_unknown_or_revoked_keys_are_refused() {
    let contacts = Command::UpdateContacts {
        key_id: id(99),
        contacts: vec!["a@x.gov.sg".into()],
    };
    expect_error(
        vec![generated(1, 10, "p", t0())],
        plain(2, contacts),
        KeyringError::KeyNotFound(id(99)),
    )
    .await;
    expect_error(
        vec![generated(1, 10, "p", t0()), revoked(2, 10, t0())],
        plain(3, Command::RevokeKey { key_id: id(10) }),
        KeyringError::KeyRevoked(id(10)),
    )
    .await;
    expect_error(
        vec![generated(1, 10, "p", t0()), revoked(2, 10, t0())],
        plain(
            3,
            Command::UpdateContacts {
                key_id: id(10),
                contacts: vec!["a@x.gov.sg".into()],
            },
        ),
        KeyringError::KeyRevoked(id(10)),
    )
    .await;
}

#[tokio::test]
async fn revoke_records_the_revocation() {
    framework_at(t0())
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(plain(2, Command::RevokeKey { key_id: id(10) }))
        .await
        .then_expect_events(vec![revoked(2, 10, t0())]);
}

fn rotate(cmd: u128, old: u128, new: u128, label: &str, grace: Option<i64>) -> KeyringCommand {
    KeyringCommand {
        command_id: id(cmd),
        command: Command::RotateKey {
            key_id: id(old),
            label: label.into(),
            grace_seconds: grace,
            revoke_old_on_first_use: false,
        },
        material: Some(material(new)),
    }
}

#[tokio::test]
async fn rotate_issues_a_successor_and_cuts_the_old_key_to_the_grace() {
    let now = t0() + Duration::days(30);
    TestFramework::<Keyring>::with(services_at(now, Policy::default()))
        .given(vec![generated(1, 10, "prod", t0())])
        .when_async(rotate(2, 10, 11, "prod-2", None))
        .await
        .then_expect_events(rotation(now, false));
}

#[tokio::test]
async fn rotation_never_extends_the_old_key() {
    let original_expiry = Policy::default().expiry_for(t0());
    let now = original_expiry - Duration::hours(1);
    let events = TestFramework::<Keyring>::with(services_at(now, Policy::default()))
        .given(vec![generated(1, 10, "prod", t0())])
        .when_async(rotate(2, 10, 11, "prod-2", Some(86_400)))
        .await
        .inspect_result()
        .expect("accepted");
    match &events[1].0 {
        KeyringEvent::KeyRotated(r) => assert_eq!(r.old_key_expires_at, original_expiry),
        other => panic!("expected KeyRotated, got {other:?}"),
    }
}

#[tokio::test]
async fn rotate_refusals() {
    let g = || vec![generated(1, 10, "prod", t0())];
    expect_error(
        g(),
        rotate(2, 10, 11, "prod", None),
        KeyringError::DuplicateLabel("prod".into()),
    )
    .await;
    expect_error(
        g(),
        rotate(2, 10, 11, "x", Some(-1)),
        KeyringError::InvalidGrace {
            max_seconds: 30 * 86_400,
        },
    )
    .await;
    expect_error(
        g(),
        rotate(2, 99, 11, "x", None),
        KeyringError::KeyNotFound(id(99)),
    )
    .await;
    let mut twice = g();
    twice.extend(
        TestFramework::<Keyring>::with(services_at(t0(), Policy::default()))
            .given(g())
            .when_async(rotate(2, 10, 11, "x", None))
            .await
            .inspect_result()
            .expect("first rotation"),
    );
    expect_error(
        twice,
        rotate(3, 10, 12, "y", None),
        KeyringError::KeyAlreadyRotated {
            key_id: id(10),
            successor: id(11),
        },
    )
    .await;
    TestFramework::<Keyring>::with(services_at(t0() + Duration::days(200), Policy::default()))
        .given(g())
        .when_async(rotate(2, 10, 11, "x", None))
        .await
        .then_expect_error(KeyringError::KeyExpired(id(10)));
}

#[tokio::test]
async fn expire_only_at_or_after_expiry_and_harmless_when_repeated() {
    let expiry = Policy::default().expiry_for(t0());
    let expire = |cmd| plain(cmd, Command::ExpireKey { key_id: id(10) });
    expect_error(
        vec![generated(1, 10, "p", t0())],
        expire(2),
        KeyringError::KeyNotExpired {
            key_id: id(10),
            expires_at: expiry,
        },
    )
    .await;
    let expired = StoredEvent(KeyringEvent::KeyExpired(KeyExpired {
        command_id: id(2),
        key_id: id(10),
        expires_at: expiry,
        expired_at: expiry,
        recipients: vec!["ops@agency.gov.sg".into()],
        label: "p".into(),
        last_five: material(10).last_five,
        login_email: LOGIN.into(),
    }));
    TestFramework::<Keyring>::with(services_at(expiry, Policy::default()))
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(expire(2))
        .await
        .then_expect_events(vec![expired.clone()]);
    TestFramework::<Keyring>::with(services_at(expiry + Duration::days(1), Policy::default()))
        .given(vec![generated(1, 10, "p", t0()), expired])
        .when_async(expire(3))
        .await
        .then_expect_events(vec![]);
}

fn migrate(cmd: u128, key: u128, hash: &str) -> KeyringCommand {
    KeyringCommand {
        command_id: id(cmd),
        command: Command::MigrateLegacyKey {
            login_email: LOGIN.into(),
            legacy_hash: hash.into(),
            created_at: None,
        },
        material: Some(material(key)),
    }
}

fn legacy_hash() -> String {
    format!("johndoe_v1_{}", "abcdefghijklmnopqrstuvwxyz01234")
}

#[tokio::test]
async fn migrate_legacy_key_once() {
    let migrated = StoredEvent(KeyringEvent::LegacyKeyMigrated(LegacyKeyMigrated {
        command_id: id(1),
        key_id: id(10),
        label: "default".into(),
        last_five: "*****".into(),
        legacy_hash: legacy_hash(),
        hash_scheme: HASH_SCHEME_LEGACY_BCRYPT.into(),
        login_email: LOGIN.into(),
        created_at: t0(),
        expires_at: Utc
            .with_ymd_and_hms(2024, 4, 21, 0, 0, 0)
            .single()
            .expect("t"),
        migrated_at: t0(),
    }));
    framework_at(t0())
        .given_no_previous_events()
        .when_async(migrate(1, 10, &legacy_hash()))
        .await
        .then_expect_events(vec![migrated.clone()]);
    expect_error(
        vec![migrated.clone()],
        migrate(2, 11, &legacy_hash()),
        KeyringError::LegacyAlreadyMigrated(id(10)),
    )
    .await;
    // Migrated after its fixed expiry: recorded expired at once, and nobody is told.
    framework_at(t0())
        .given(vec![migrated])
        .when_async(plain(3, Command::ExpireKey { key_id: id(10) }))
        .await
        .then_expect_events(vec![StoredEvent(KeyringEvent::KeyExpired(KeyExpired {
            command_id: id(3),
            key_id: id(10),
            expires_at: Utc
                .with_ymd_and_hms(2024, 4, 21, 0, 0, 0)
                .single()
                .expect("t"),
            expired_at: t0(),
            recipients: vec![],
            label: "default".into(),
            last_five: "*****".into(),
            login_email: LOGIN.into(),
        }))]);
}

#[tokio::test]
async fn migrate_rejects_bad_hashes() {
    let result = framework_at(t0())
        .given_no_previous_events()
        .when_async(migrate(1, 10, "nope"))
        .await
        .inspect_result();
    assert!(matches!(result, Err(KeyringError::InvalidLegacyHash(_))));
    let other_user = format!("janedoe_v1_{}", "a".repeat(31));
    let result = framework_at(t0())
        .given_no_previous_events()
        .when_async(migrate(1, 10, &other_user))
        .await
        .inspect_result();
    assert!(matches!(
        result,
        Err(KeyringError::InvalidLegacyHash(
            LegacyHashError::Username { .. }
        ))
    ));
}

#[test]
fn a_handled_command_is_remembered_with_its_sequences() {
    let mut k = Keyring::default();
    k.apply(generated(1, 10, "a", t0()));
    let rotated = Keyring::default()
        .decide(&rotate(2, 10, 11, "b", None), t0(), &Policy::default())
        .err();
    assert!(rotated.is_some(), "an empty keyring has nothing to rotate");
    for e in k
        .decide(&rotate(2, 10, 11, "b", None), t0(), &Policy::default())
        .expect("rotates")
    {
        k.apply(StoredEvent(e));
    }
    assert_eq!(
        k.prior_outcome(id(1)).map(|o| o.sequences.clone()),
        Some(vec![1])
    );
    let o = k.prior_outcome(id(2)).expect("remembered");
    assert_eq!(o.sequences, vec![2, 3]);
    assert_eq!(o.key_id, Some(id(11)));
    assert!(k.prior_outcome(id(3)).is_none());
}

fn remind(cmd: u128, stage: u32, skipping: &[u32]) -> KeyringCommand {
    plain(
        cmd,
        Command::SendExpiryReminder {
            key_id: id(10),
            stage,
            skipping: skipping.to_vec(),
            last_used_at: None,
            usage_since: None,
        },
    )
}

fn reminder_due(cmd: u128, stage: u32, skipped: &[u32], recipients: &[&str]) -> StoredEvent {
    let expiry = Policy::default().expiry_for(t0());
    StoredEvent(KeyringEvent::ExpiryReminderDue(ExpiryReminderDue {
        command_id: id(cmd),
        key_id: id(10),
        stage,
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        expires_at: expiry,
        due_at: expiry - Duration::days(i64::from(stage)),
        skipped_stages: skipped.to_vec(),
        label: "p".into(),
        last_five: material(10).last_five,
        login_email: LOGIN.into(),
        ..Default::default()
    }))
}

fn framework_days_before_expiry(days: i64) -> TestFramework<Keyring> {
    framework_at(Policy::default().expiry_for(t0()) - Duration::days(days))
}

#[tokio::test]
async fn a_due_reminder_is_decided_once_to_the_contacts_of_that_moment() {
    let contacts_now = StoredEvent(KeyringEvent::ContactsUpdated(ContactsUpdated {
        command_id: id(2),
        key_id: id(10),
        contacts: vec!["new@agency.gov.sg".into()],
        updated_at: t0(),
    }));
    framework_days_before_expiry(28)
        .given(vec![generated(1, 10, "p", t0()), contacts_now.clone()])
        .when_async(remind(3, 28, &[]))
        .await
        .then_expect_events(vec![reminder_due(3, 28, &[], &["new@agency.gov.sg"])]);
    // Again, under another command id: already decided, nothing new.
    framework_days_before_expiry(27)
        .given(vec![
            generated(1, 10, "p", t0()),
            contacts_now,
            reminder_due(3, 28, &[], &["new@agency.gov.sg"]),
        ])
        .when_async(remind(4, 28, &[]))
        .await
        .then_expect_events(vec![]);
}

#[tokio::test]
async fn a_reminder_is_refused_before_its_stage_falls_due() {
    let expiry = Policy::default().expiry_for(t0());
    framework_days_before_expiry(29)
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(remind(3, 28, &[]))
        .await
        .then_expect_error(KeyringError::ReminderNotDue {
            key_id: id(10),
            stage: 28,
            due_at: expiry - Duration::days(28),
        });
    framework_days_before_expiry(29)
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(remind(3, 0, &[]))
        .await
        .then_expect_error(KeyringError::InvalidStage);
}

#[tokio::test]
async fn only_the_configured_stages_are_reminded() {
    // Day 5 is due (expiry is 4 days away) but is not a configured stage (28, 14, 3, 1): a
    // forged command cannot make the notifier mail the contacts on a day of its choosing.
    framework_days_before_expiry(4)
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(remind(3, 5, &[]))
        .await
        .then_expect_error(KeyringError::InvalidStage);
    // Nor can it slip unconfigured stages in as "skipped".
    framework_days_before_expiry(3)
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(remind(3, 3, &[14, 9, 5]))
        .await
        .then_expect_events(vec![reminder_due(3, 3, &[14], &["ops@agency.gov.sg"])]);
}

#[tokio::test]
async fn no_reminder_for_a_revoked_or_expired_key() {
    framework_days_before_expiry(2)
        .given(vec![generated(1, 10, "p", t0()), revoked(2, 10, t0())])
        .when_async(remind(3, 3, &[]))
        .await
        .then_expect_error(KeyringError::KeyRevoked(id(10)));
    framework_days_before_expiry(-1)
        .given(vec![generated(1, 10, "p", t0())])
        .when_async(remind(3, 1, &[]))
        .await
        .then_expect_error(KeyringError::KeyExpired(id(10)));
}

#[tokio::test]
async fn after_downtime_the_latest_stage_is_sent_and_the_earlier_ones_skipped() {
    framework_days_before_expiry(2)
        .given(vec![
            generated(1, 10, "p", t0()),
            reminder_due(2, 28, &[], &["ops@agency.gov.sg"]),
        ])
        .when_async(remind(3, 3, &[28, 14]))
        .await
        .then_expect_events(vec![reminder_due(3, 3, &[14], &["ops@agency.gov.sg"])]);
    // A skipped stage is never sent later.
    framework_days_before_expiry(2)
        .given(vec![
            generated(1, 10, "p", t0()),
            reminder_due(3, 3, &[28, 14], &["ops@agency.gov.sg"]),
        ])
        .when_async(remind(4, 14, &[]))
        .await
        .then_expect_events(vec![]);
}

/// The two events of a rotation of key 10 into key 11 at `now` (command 2, the default
/// grace), revoking on first use or not.
fn rotation(now: DateTime<Utc>, revoke_old_on_first_use: bool) -> Vec<StoredEvent> {
    let mut new_key = generated(2, 11, "prod-2", now);
    if let KeyringEvent::KeyGenerated(e) = &mut new_key.0 {
        e.rotated_from = Some(id(10));
    }
    vec![
        new_key,
        StoredEvent(KeyringEvent::KeyRotated(KeyRotated {
            command_id: id(2),
            old_key_id: id(10),
            new_key_id: id(11),
            old_key_expires_at: now + Duration::hours(24),
            rotated_at: now,
            revoke_old_on_first_use,
        })),
    ]
}

#[tokio::test]
async fn a_rotation_may_end_on_the_successors_first_use() {
    let now = t0() + Duration::days(30);
    let mut command = rotate(2, 10, 11, "prod-2", None);
    if let Command::RotateKey {
        revoke_old_on_first_use,
        ..
    } = &mut command.command
    {
        *revoke_old_on_first_use = true;
    }
    TestFramework::<Keyring>::with(services_at(now, Policy::default()))
        .given(vec![generated(1, 10, "prod", t0())])
        .when_async(command)
        .await
        .then_expect_events(rotation(now, true));

    // Given that rotation, the first use of key 11 revokes key 10 with cause "rotated".
    let later = now + Duration::hours(2);
    let mut given = vec![generated(1, 10, "prod", t0())];
    given.extend(rotation(now, true));
    TestFramework::<Keyring>::with(services_at(later, Policy::default()))
        .given(given.clone())
        .when_async(plain(3, Command::RetireRotatedKey { new_key_id: id(11) }))
        .await
        .then_expect_events(vec![StoredEvent(KeyringEvent::KeyRevoked(KeyRevoked {
            command_id: id(3),
            key_id: id(10),
            revoked_at: later,
            cause: Some(keyledger_events::RevokeCause::Rotated),
            source: None,
            ..Default::default()
        }))]);

    // Once key 10 is gone (revoked, or past its grace), there is nothing to retire.
    let mut gone = given.clone();
    gone.push(revoked(3, 10, later));
    expect_error(
        gone,
        plain(4, Command::RetireRotatedKey { new_key_id: id(11) }),
        KeyringError::NothingToRetire(id(11)),
    )
    .await;
    // Nor when the successor itself was revoked meanwhile (an instance that had not heard of
    // it yet saw it used): the old key must not go too.
    let mut successor_gone = given.clone();
    successor_gone.push(revoked(3, 11, later));
    expect_error(
        successor_gone,
        plain(4, Command::RetireRotatedKey { new_key_id: id(11) }),
        KeyringError::NothingToRetire(id(11)),
    )
    .await;
    TestFramework::<Keyring>::with(services_at(now + Duration::days(2), Policy::default()))
        .given(given)
        .when_async(plain(4, Command::RetireRotatedKey { new_key_id: id(11) }))
        .await
        .then_expect_error(KeyringError::NothingToRetire(id(11)));
}

#[tokio::test]
async fn only_a_first_use_rotation_retires_anything() {
    let now = t0() + Duration::days(30);
    let mut given = vec![generated(1, 10, "prod", t0())];
    given.extend(rotation(now, false));
    expect_error(
        given,
        plain(3, Command::RetireRotatedKey { new_key_id: id(11) }),
        KeyringError::NothingToRetire(id(11)),
    )
    .await;
    expect_error(
        vec![generated(1, 10, "prod", t0())],
        plain(3, Command::RetireRotatedKey { new_key_id: id(10) }),
        KeyringError::NothingToRetire(id(10)),
    )
    .await;
}

fn leaked(cmd: u128, key: u128) -> KeyringCommand {
    plain(
        cmd,
        Command::RevokeLeakedKey {
            key_id: id(key),
            source: "https://example.test/repo/.env".into(),
            reporter: "scanner".into(),
        },
    )
}

#[tokio::test]
async fn a_leaked_key_is_revoked_with_its_source_and_its_contacts_named() {
    let now = t0() + Duration::days(3);
    framework_at(now)
        .given(vec![generated(1, 10, "prod", t0())])
        .when_async(leaked(2, 10))
        .await
        .then_expect_events(vec![StoredEvent(KeyringEvent::KeyRevoked(KeyRevoked {
            command_id: id(2),
            key_id: id(10),
            revoked_at: now,
            cause: Some(keyledger_events::RevokeCause::Leaked),
            source: Some("https://example.test/repo/.env".into()),
            reporter: "scanner".into(),
            recipients: vec!["ops@agency.gov.sg".into()],
            label: "prod".into(),
            last_five: material(10).last_five,
            login_email: LOGIN.into(),
        }))]);
}

#[tokio::test]
async fn a_leak_of_a_revoked_or_expired_key_changes_nothing() {
    expect_error(
        vec![generated(1, 10, "prod", t0()), revoked(2, 10, t0())],
        leaked(3, 10),
        KeyringError::KeyRevoked(id(10)),
    )
    .await;
    framework_at(Policy::default().expiry_for(t0()) + Duration::seconds(1))
        .given(vec![generated(1, 10, "prod", t0())])
        .when_async(leaked(3, 10))
        .await
        .then_expect_error(KeyringError::KeyExpired(id(10)));
}

#[tokio::test]
async fn a_reminder_says_never_used_only_when_usage_was_recorded_all_along() {
    let with_usage = |last: Option<DateTime<Utc>>, since: DateTime<Utc>| {
        let mut c = remind(3, 28, &[]);
        if let Command::SendExpiryReminder {
            last_used_at,
            usage_since,
            ..
        } = &mut c.command
        {
            (*last_used_at, *usage_since) = (last, Some(since));
        }
        c
    };
    let due = |last: Option<DateTime<Utc>>, never: bool| {
        let StoredEvent(KeyringEvent::ExpiryReminderDue(mut e)) =
            reminder_due(3, 28, &[], &["ops@agency.gov.sg"])
        else {
            unreachable!()
        };
        e.label = "p".into();
        e.last_used_at = last;
        e.never_used = never;
        StoredEvent(KeyringEvent::ExpiryReminderDue(e))
    };
    let used = t0() + Duration::days(40);
    for (last, since, expected) in [
        (Some(used), t0(), due(Some(used), false)),
        (None, t0() - Duration::days(1), due(None, true)),
        // Usage recorded only since after the key was made: it may have been used before.
        (None, t0() + Duration::days(1), due(None, false)),
    ] {
        framework_days_before_expiry(28)
            .given(vec![generated(1, 10, "p", t0())])
            .when_async(with_usage(last, since))
            .await
            .then_expect_events(vec![expected]);
    }
}
