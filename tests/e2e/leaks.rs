//! Leak reports and usage (issue 13), end to end: two instances on the real PostgreSQL and
//! the real broker, a real SMTP server on 127.0.0.1, scoped tokens.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::{DateTime, Utc};
use keyledger::config::Roles;
use keyledger::domain::Policy;
use keyledger::tokens::{self, Role};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::bus::{first_result, read_until, wait_for};
use crate::common::{settings_with, Backing, TestApp, LOGIN};
use crate::kafka::{self, produce};
use crate::reminders::fast_reminders;
use crate::smtp::SmtpSink;

/// How long "no more email arrives" is watched for (many notifier polls).
const QUIET: Duration = Duration::from_millis(2500);
const SOURCE: &str = "https://github.com/agency/notify-service/blob/main/.env";

async fn new_key(app: &TestApp, account: &str, label: &str, contacts: &[&str]) -> (String, String) {
    let (status, body) = app.generate(account, label, contacts).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (
        body["key_id"].as_str().expect("id").to_owned(),
        body["api_key"].as_str().expect("key").to_owned(),
    )
}

async fn refused_within(app: &TestApp, key: &str, within: Duration) {
    let started = std::time::Instant::now();
    loop {
        let v = app.verify(key, None).await;
        if v["valid"] == json!(false) {
            assert_eq!(v["code"], "revoked", "{v}");
            return;
        }
        assert!(started.elapsed() < within, "still valid after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn last_five(key: &str) -> &str {
    &key[key.len() - 5..]
}

/// A key-shaped string keyledger never issued.
fn stranger() -> String {
    format!("someone_v1_{}", STANDARD.encode([7u8; 33]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_key_is_revoked_everywhere_and_its_contacts_told_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens.toml");
    let reporter = tokens::add(&file, "secret-scanner", Role::Reporter).expect("add");
    let smtp = SmtpSink::start().await;
    let backing = Backing::postgres().await;
    let bus = kafka::bus();
    // A takes no bus commands: a process with the commands role alone (no in-memory index)
    // does, and must still find the keys a ReportLeak names.
    let roles = Roles::parse("http,relay,projector,saga,notifier").expect("roles");
    let mut settings = settings_with(&backing, Policy::default(), Some(bus.clone()), roles);
    settings.tokens_file = Some(file.clone());
    settings.reminders = fast_reminders(&smtp);
    let a = TestApp::spawn_settings(backing.clone(), settings).await;
    let Backing::Postgres(url) = backing.clone() else {
        unreachable!()
    };
    let _commands = kafka::spawn_process(&url, &bus, "commands").await;
    let b = TestApp::spawn_bus(backing, bus.clone(), Roles::parse("http").expect("roles")).await;

    let contacts = ["ops@agency.gov.sg", "dev@agency.gov.sg"];
    let (key_id, key) = new_key(&a, "acct-l", "prod", &contacts).await;
    let (_, other) = new_key(&a, "acct-l", "staging", &["ops@agency.gov.sg"]).await;
    wait_for("B holds the key", || async {
        b.verify(&key, None).await["valid"] == json!(true)
    })
    .await;

    // A reporter token reports it, with a stranger and a typo.
    let report = json!({
        "keys": [key, stranger(), "not-a-key-12345"],
        "source": SOURCE,
        "reporter": "github-secret-scanning",
    });
    let (status, body) = a
        .call_as(&reporter, Method::POST, "/v1/leaks", Some(report.clone()))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"results": [
            {"last_five": last_five(&key), "result": "revoked"},
            {"last_five": last_five(&stranger()), "result": "unknown"},
            {"last_five": "12345", "result": "malformed"},
        ]}),
        "per key, in order, and nothing about the account"
    );
    // Refused at once here, and within the bus's promise on the other instance.
    assert_eq!(a.verify(&key, None).await["code"], "revoked");
    refused_within(&b, &key, Duration::from_secs(2)).await;
    assert_eq!(
        a.verify(&other, None).await["valid"],
        json!(true),
        "only the reported key"
    );

    // Its two contacts hear of it once each, naming where it was found.
    smtp.wait_for(Duration::from_secs(30), |m| m.len() >= 2)
        .await;
    tokio::time::sleep(QUIET).await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "one email per contact: {mails:?}");
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, vec!["dev@agency.gov.sg", "ops@agency.gov.sg"]);
    for m in &mails {
        let body = m.body();
        assert!(m.subject().contains("revoked"), "{}", m.subject());
        assert!(body.contains(SOURCE), "{body}");
        assert!(
            body.contains(last_five(&key)) && body.contains("\"prod\""),
            "{body}"
        );
        assert!(!body.contains(&key), "never the key itself");
    }

    // The log says why and where; the notifications topic says stage "leaked".
    let (_, history) = a
        .call(
            Method::GET,
            &format!("/v1/accounts/acct-l/keys/{key_id}/history"),
            None,
        )
        .await;
    let last = history["events"]
        .as_array()
        .and_then(|e| e.last())
        .cloned()
        .expect("events");
    assert_eq!(last["event_type"], "KeyRevoked");
    assert_eq!(last["payload"]["cause"], "leaked");
    assert_eq!(last["payload"]["source"], SOURCE);
    assert_eq!(last["payload"]["reporter"], "github-secret-scanning");
    assert_eq!(
        last["actor"], "secret-scanner",
        "the caller's token name, as always"
    );
    let kid = key_id.clone();
    let notes = read_until(bus.notifications_topic(), move |r| {
        r.iter()
            .filter(|n| n.json()["key_id"] == json!(kid))
            .count()
            >= 2
    })
    .await;
    let notes: Vec<Value> = notes
        .iter()
        .map(|n| n.json())
        .filter(|n| n["key_id"] == json!(key_id))
        .collect();
    assert_eq!(notes.len(), 2);
    for n in &notes {
        assert_eq!(
            (&n["stage"], &n["kind"]),
            (&json!("leaked"), &json!("key_leaked"))
        );
    }

    // Reported again: already inactive, nothing changes, no email.
    let events = a.event_count().await;
    let (status, body) = a
        .call_as(&reporter, Method::POST, "/v1/leaks", Some(report))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["result"], "already_inactive");
    tokio::time::sleep(QUIET).await;
    assert_eq!(smtp.mails().len(), 2, "no second email");
    assert_eq!(a.event_count().await, events, "nothing recorded");

    // A reporter reports and does nothing else; bad reports are precise errors.
    let (status, _) = a
        .call_as(&reporter, Method::GET, "/v1/accounts/acct-l/keys", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = a
        .call_as(
            &reporter,
            Method::POST,
            "/v1/verify",
            Some(json!({"api_key": other})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let too_many: Vec<String> = (0..101).map(|_| stranger()).collect();
    for bad in [
        json!({"keys": too_many, "source": SOURCE}),
        json!({"keys": [], "source": SOURCE}),
        json!({"keys": [other], "source": "  "}),
        json!({"keys": other, "source": SOURCE}),
    ] {
        let (status, body) = a
            .call_as(&reporter, Method::POST, "/v1/leaks", Some(bad))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(
            !body.to_string().contains(&other),
            "no key in an error: {body}"
        );
    }
    assert_eq!(
        a.verify(&other, None).await["valid"],
        json!(true),
        "refused reports do nothing"
    );

    // Over the bus: ReportLeak, its result per key; a redelivery gets the same answer.
    let command_id = Uuid::new_v4();
    let envelope = json!({
        "command_id": command_id, "account_id": "leak-desk", "issued_by": "scanner",
        "command": {"type": "ReportLeak", "keys": [other], "source": "ticket 4711",
                    "reporter": "helpdesk"},
    });
    let producer = kafka::producer();
    let raw = serde_json::to_vec(&envelope).expect("json");
    produce(&producer, &bus.commands_topic(), "leak-desk", &raw).await;
    let result = first_result(&bus, command_id).await;
    assert_eq!(result["status"], "accepted", "{result}");
    assert_eq!(
        result["results"],
        json!([{"last_five": last_five(&other), "result": "revoked"}])
    );
    refused_within(&b, &other, Duration::from_secs(2)).await;
    produce(&producer, &bus.commands_topic(), "leak-desk", &raw).await;
    let topic = bus.results_topic();
    let cid = command_id.to_string();
    let both = read_until(topic, move |r| {
        r.iter().filter(|x| x.key == cid).count() >= 2
    })
    .await;
    let answers: Vec<Value> = both
        .iter()
        .filter(|r| r.key == command_id.to_string())
        .map(|r| r.json()["results"].clone())
        .collect();
    assert_eq!(answers.len(), 2);
    assert_eq!(
        answers[0], answers[1],
        "a redelivery gets the original answer"
    );
    let mails = smtp
        .wait_for(Duration::from_secs(30), |m| m.len() >= 3)
        .await;
    assert!(mails.iter().any(|m| m.body().contains("ticket 4711")));

    // A report that cannot be read becomes a dead letter without the key in it.
    let (_, third) = new_key(&a, "acct-l", "third", &["ops@agency.gov.sg"]).await;
    let broken = format!(
        r#"{{"command_id":"{}","account_id":"leak-desk","command":{{"type":"ReportLeak","keys":"{third}","source":"x"}}}}"#,
        Uuid::new_v4()
    );
    produce(
        &producer,
        &bus.commands_topic(),
        "leak-desk",
        broken.as_bytes(),
    )
    .await;
    let dead = read_until(bus.dead_letters_topic(), |r| !r.is_empty()).await;
    let letter = dead.first().map(|r| r.json()).expect("a dead letter");
    let original = STANDARD
        .decode(letter["original"].as_str().expect("original"))
        .expect("base64");
    let original = String::from_utf8_lossy(&original);
    assert!(!original.contains(&third), "{original}");
    assert!(!letter["reason"]
        .as_str()
        .unwrap_or_default()
        .contains(&third));
    assert!(original.contains(last_five(&third)), "{original}");

    // What the reports did is counted.
    let metrics = a.metrics_text().await;
    for result in ["revoked", "unknown", "malformed", "already_inactive"] {
        let line = format!("keyledger_leaks_reported_total{{result=\"{result}\"}}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // (The bus report was the commands process's.)
    assert!(
        metrics.contains("keyledger_keys_revoked_for_leaks_total 1"),
        "{metrics}"
    );
}

fn row<'a>(listing: &'a Value, key_id: &str) -> &'a Value {
    listing["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|r| r["key_id"] == json!(key_id)))
        .unwrap_or_else(|| panic!("{key_id} listed: {listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_two_instances_is_summed_in_the_listing() {
    let backing = Backing::postgres().await;
    let bus = kafka::bus();
    let flush = Duration::from_millis(300);
    let mut sa = settings_with(&backing, Policy::default(), Some(bus.clone()), Roles::ALL);
    sa.usage_flush = Some(flush);
    let mut sb = settings_with(
        &backing,
        Policy::default(),
        Some(bus),
        Roles::parse("http").expect("roles"),
    );
    sb.usage_flush = Some(flush);
    let a = TestApp::spawn_settings(backing.clone(), sa).await;
    let b = TestApp::spawn_settings(backing, sb).await;

    let (used_id, used) = new_key(&a, "acct-u", "prod", &["ops@agency.gov.sg"]).await;
    let (unused_id, _) = new_key(&a, "acct-u", "spare", &["ops@agency.gov.sg"]).await;
    // B applies an account's events in order: once it knows the probe, it knows both.
    let (probe_id, probe) = new_key(&a, "acct-u", "probe", &["ops@agency.gov.sg"]).await;
    wait_for("B holds the keys", || async {
        b.verify(&probe, None).await["valid"] == json!(true)
    })
    .await;

    let before: DateTime<Utc> = Utc::now();
    for app in [&a, &b] {
        for _ in 0..5 {
            assert_eq!(app.verify(&used, Some(LOGIN)).await["valid"], json!(true));
        }
    }
    let after = Utc::now();
    let mut listing = Value::Null;
    for _ in 0..100 {
        // The listing table follows the events topic; the usage, each instance's flush.
        listing = a.list("acct-u").await;
        let rows = listing["keys"].as_array().map(Vec::len).unwrap_or(0);
        if rows == 3 && row(&listing, &used_id)["verifications_30d"] == json!(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let used_row = row(&listing, &used_id);
    assert_eq!(used_row["verifications_30d"], json!(10), "{listing}");
    let last: DateTime<Utc> = used_row["last_used_at"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("last_used_at");
    // Recorded by the flush that carried the count: within one flush interval of the use.
    let latest = after + chrono::Duration::from_std(flush).expect("interval");
    assert!(
        last >= before - chrono::Duration::seconds(1)
            && last <= latest + chrono::Duration::seconds(1),
        "{last} not within [{before}, {latest}]"
    );
    let unused_row = row(&listing, &unused_id);
    assert_eq!(unused_row["last_used_at"], Value::Null);
    assert_eq!(unused_row["verifications_30d"], json!(0));

    // unused_for: only the key no one has verified.
    let (status, body) = a
        .call(Method::GET, "/v1/accounts/acct-u/keys?unused_for=1", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<&str> = body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|r| r["key_id"].as_str())
        .collect();
    assert_eq!(ids, vec![unused_id.as_str()], "{body}");
    assert!(!ids.contains(&probe_id.as_str()));
    let (status, body) = a
        .call(
            Method::GET,
            "/v1/accounts/acct-u/keys?unused_for=soon",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let metrics = b.metrics_text().await;
    assert!(
        metrics.contains("keyledger_usage_flush_lag_seconds"),
        "{metrics}"
    );
}

/// A migrated legacy key reported before anyone verified it: found through Postman's
/// bcrypt scheme (the legacy gate), revoked, and counted as no use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_legacy_key_is_found_by_its_bcrypt_hash_and_revoked() {
    use crate::common::post;
    let (plaintext, salt, tail) = crate::common::postman_legacy_key("marylim", 10);
    let (addr, _clock) = crate::common::spawn_with_legacy_cutoff_in_30_days(&salt).await;
    let legacy = json!({"login_email": "mary.lim@agency.gov.sg", "legacy_hash": format!("marylim_v1_{tail}")});
    let (status, migrated) = post(addr, "/v1/accounts/legacy-acc/legacy-key", legacy).await;
    assert_eq!(status, StatusCode::CREATED, "{migrated}");
    let report = json!({"keys": [plaintext], "source": "a pasted curl command in a ticket"});
    let (status, body) = post(addr, "/v1/leaks", report.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"][0]["result"], "revoked", "{body}");
    let (_, v) = post(addr, "/v1/verify", json!({"api_key": plaintext})).await;
    assert_eq!(
        (&v["valid"], &v["code"]),
        (&json!(false), &json!("revoked"))
    );
    // Reported again: already inactive (the fast path knows it now).
    let (_, body) = post(addr, "/v1/leaks", report).await;
    assert_eq!(body["results"][0]["result"], "already_inactive", "{body}");
}

/// A migrated legacy key reported over the bus to a process with the commands role alone
/// (no in-memory index, so no legacy gate candidates): found in the persisted index by its
/// username and Postman's bcrypt, revoked, refused at once by the instance that verified
/// it; a later report of it to the same process — the key now revoked — is answered
/// `already_inactive`, not `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_key_reported_to_a_commands_only_process_is_found_in_the_persisted_index() {
    let (plaintext, salt, tail) = crate::common::postman_legacy_key("marylim", 10);
    let backing = Backing::postgres().await;
    let Backing::Postgres(url) = backing.clone() else {
        unreachable!()
    };
    let bus = kafka::bus();
    let policy = Policy {
        legacy_expiry: Utc::now() + chrono::Duration::days(30),
        ..Policy::default()
    };
    let roles = Roles::parse("http,relay,projector").expect("roles");
    let mut settings = settings_with(&backing, policy, Some(bus.clone()), roles);
    settings.legacy_salt = Some(salt.clone());
    let a = TestApp::spawn_settings(backing, settings).await;
    let legacy = json!({"login_email": "mary.lim@agency.gov.sg", "legacy_hash": format!("marylim_v1_{tail}")});
    let (status, body) = a
        .call(
            Method::POST,
            "/v1/accounts/legacy-acc/legacy-key",
            Some(legacy),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(a.verify(&plaintext, None).await["valid"], json!(true));
    let db = sqlx::PgPool::connect(&url).await.expect("connect");
    wait_for("the projector to persist the legacy key", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM verification_index WHERE legacy_hash IS NOT NULL",
        )
        .fetch_one(&db)
        .await
        .is_ok_and(|persisted| persisted == 1)
    })
    .await;
    let _commands = kafka::spawn_process_env(
        &url,
        &bus,
        "commands",
        &[("KEYLEDGER_LEGACY_SALT", salt.clone())],
    )
    .await;

    // A report over the bus; its per-key results.
    let producer = kafka::producer();
    let report = |source: &'static str| {
        let (producer, bus, key) = (&producer, &bus, &plaintext);
        async move {
            let command_id = Uuid::new_v4();
            let envelope = json!({
                "command_id": command_id, "account_id": "leak-desk", "issued_by": "helpdesk",
                "command": {"type": "ReportLeak", "keys": [key], "source": source},
            });
            let raw = serde_json::to_vec(&envelope).expect("json");
            produce(producer, &bus.commands_topic(), "leak-desk", &raw).await;
            first_result(bus, command_id).await["results"].clone()
        }
    };
    let result = report("ticket 4712").await;
    assert_eq!(
        result,
        json!([{"last_five": last_five(&plaintext), "result": "revoked"}]),
        "{result}"
    );
    refused_within(&a, &plaintext, Duration::from_secs(2)).await;

    let result = report("ticket 4713").await;
    assert_eq!(
        result,
        json!([{"last_five": last_five(&plaintext), "result": "already_inactive"}]),
        "{result}"
    );
}
