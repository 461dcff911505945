//! Least privilege, a log that authenticates itself, and hostile callers (issue 12): one
//! test per point, end to end over HTTP, the real broker and the real database.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyledger::config::Roles;
use keyledger::domain::{KeyHasher, LogSigner, Policy};
use keyledger::kafka::security::{Mechanism, Protocol, Sasl, Security, Tls};
use keyledger::tokens::{self, Role};
use keyledger_events::{chain, decode_event, EventEnvelope};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

use crate::bus::{
    first_result, generate_envelope, read_quiet, read_until, reply_key, results_for, wait_for,
};
use crate::common::{settings, Backing, TestApp, LOGIN, PEPPER, SIGNING_KEY};
use crate::kafka::{self, kill9, produce, spawn_process};

fn database_url(backing: &Backing) -> String {
    match backing {
        Backing::Postgres(url) => url.clone(),
        Backing::Embedded(_) => panic!("a PostgreSQL test"),
    }
}

fn generate_body(label: &str) -> Value {
    json!({"label": label, "contacts": ["ops@agency.gov.sg"], "login_email": LOGIN})
}

/// Point 1: a verifier token cannot mint; each role reaches only its routes; unknown tokens
/// get 401; the file is re-read while the service runs; every event names its actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_hold_each_caller_to_its_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens.toml");
    let issuer = tokens::add(&file, "web-backend", Role::Issuer).expect("add");
    let verifier = tokens::add(&file, "sending-api", Role::Verifier).expect("add");
    let reader = tokens::add(&file, "settings-page", Role::Reader).expect("add");
    let text = std::fs::read_to_string(&file).expect("file");
    for t in [&issuer, &verifier, &reader] {
        assert!(!text.contains(t.as_str()), "the file keeps hashes only");
    }
    let backing = Backing::postgres().await;
    let mut s = settings(&backing, Policy::default());
    s.tokens_file = Some(file.clone());
    let app = TestApp::spawn_settings(backing.clone(), s).await;
    let keys = "/v1/accounts/acct-t/keys";

    // The sending service's token verifies; it can no longer mint keys.
    let (status, body) = app
        .call_as(&verifier, Method::POST, keys, Some(generate_body("prod")))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    let (status, body) = app
        .call_as(&issuer, Method::POST, keys, Some(generate_body("prod")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key = body["api_key"].as_str().expect("key").to_owned();
    let verify = json!({"api_key": key});
    let (status, body) = app
        .call_as(&verifier, Method::POST, "/v1/verify", Some(verify.clone()))
        .await;
    assert_eq!((status, &body["valid"]), (StatusCode::OK, &json!(true)));
    // An issuer does not verify; a reader lists and does nothing else.
    for (token, method, path, body, expected) in [
        (
            &issuer,
            Method::POST,
            "/v1/verify",
            Some(verify.clone()),
            StatusCode::FORBIDDEN,
        ),
        (&reader, Method::GET, keys, None, StatusCode::OK),
        (&reader, Method::GET, "/v1/reminders", None, StatusCode::OK),
        (
            &reader,
            Method::POST,
            keys,
            Some(generate_body("r")),
            StatusCode::FORBIDDEN,
        ),
        (
            &reader,
            Method::POST,
            "/v1/verify",
            Some(verify.clone()),
            StatusCode::FORBIDDEN,
        ),
        (
            &"not-a-token".to_owned(),
            Method::GET,
            keys,
            None,
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let (status, answer) = app.call_as(token, method.clone(), path, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
    }
    // The admin token still does everything.
    let (status, _) = app.call(Method::POST, "/v1/verify", Some(verify)).await;
    assert_eq!(status, StatusCode::OK);

    // Every event names who issued its command.
    let mut db = PgConnection::connect(&database_url(&backing))
        .await
        .expect("db");
    let actors: Vec<String> = sqlx::query_scalar("SELECT metadata->>'actor' FROM events")
        .fetch_all(&mut db)
        .await
        .expect("actors");
    assert_eq!(actors, vec!["web-backend".to_owned()]);

    // A token added while the service runs works within seconds; a revoked one stops.
    let late = tokens::add(&file, "late-reader", Role::Reader).expect("add");
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.call_as(&late, Method::GET, keys, None).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "a new token is picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokens::revoke(&file, "web-backend").expect("revoke");
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.call_as(&issuer, Method::GET, keys, None).await.0 != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "a revoked token stops working");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The log's public key is open to anyone.
    let (status, body) = crate::common::read(app.get_open("/v1/log-key").await).await;
    assert_eq!(status, StatusCode::OK);
    let expected = LogSigner::from_base64(SIGNING_KEY)
        .expect("seed")
        .public_key();
    assert_eq!(
        body,
        json!({"algorithm": "ed25519", "public_key": expected.to_base64(), "previous_public_keys": []})
    );
}

/// Point 2: a command only keyledger may issue is refused on the bus, and no email follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_command_on_the_bus_is_refused_and_sends_nothing() {
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(Backing::postgres().await, bus.clone(), Roles::ALL).await;
    let (status, body) = app.generate("acct-r", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let command_id = Uuid::new_v4();
    let envelope = json!({
        "command_id": command_id, "account_id": "acct-r", "issued_by": "intruder",
        "command": {"type": "SendExpiryReminder", "key_id": body["key_id"], "stage": 1}
    });
    let value = serde_json::to_vec(&envelope).expect("json");
    produce(&kafka::producer(), &bus.commands_topic(), "acct-r", &value).await;
    let result = &first_result(&bus, command_id).await;
    assert_eq!(result["status"], "rejected", "{result}");
    assert_eq!(result["error"]["code"], "forbidden_command", "{result}");
    let notifications = read_quiet(bus.notifications_topic(), Duration::from_secs(3)).await;
    assert!(notifications.is_empty(), "no email: {notifications:?}");
    let events = read_quiet(bus.events_topic(), Duration::from_secs(1)).await;
    assert!(events
        .iter()
        .all(|e| e.json()["event_type"] != "ExpiryReminderDue"));
}

/// A KeyGenerated for `forged_key` that follows `first` (the account's real first event
/// as the topic carries it), chained correctly, at `sequence`, signed by `signer` if any.
fn forge(first: &Value, sequence: u64, forged_key: &str, signer: Option<&LogSigner>) -> Vec<u8> {
    let account = first["account_id"].as_str().expect("account");
    let mut e = first.clone();
    e["sequence"] = json!(sequence);
    e["event_id"] = json!(EventEnvelope::event_id_for(account, sequence));
    e["payload"]["key_id"] = json!(Uuid::new_v4());
    e["payload"]["label"] = json!(format!("forged-{sequence}"));
    e["payload"]["key_hash"] = json!(KeyHasher::new(PEPPER.as_bytes()).hash_hex(forged_key));
    e["previous_chain"] = first["chain"].clone();
    let decoded = decode_event(&serde_json::to_vec(&e).expect("json")).expect("decodes");
    let previous = chain::from_hex(first["chain"].as_str().expect("chain")).expect("hex");
    let value = chain::next(&previous, account, sequence, &decoded.event);
    e["chain"] = json!(chain::to_hex(&value));
    match signer {
        Some(s) => e["signature"] = json!(s.sign(&value)),
        None => {
            e.as_object_mut().expect("object").remove("signature");
        }
    }
    serde_json::to_vec(&e).expect("json")
}

async fn audit_kafka(url: &str, bus: &keyledger::kafka::BusConfig, public_key: &str) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args([
            "audit",
            "--from",
            "kafka",
            "--json",
            "--public-key",
            public_key,
        ])
        .env("KEYLEDGER_DATABASE_URL", url)
        .env("KEYLEDGER_KAFKA_BROKERS", &bus.brokers)
        .env("KEYLEDGER_TOPIC_PREFIX", &bus.topic_prefix)
        .output()
        .await
        .expect("audit runs");
    assert!(!out.status.success(), "a forged log fails the audit");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Point 3: records produced straight onto the events topic, well-formed and chained but
/// not signed by the log's key, are never applied, are dead-lettered with the reason, and
/// `audit --public-key` names them; a forged high sequence cannot hide a later revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_on_the_events_topic_is_refused_and_named_by_the_audit() {
    let backing = Backing::postgres().await;
    let url = database_url(&backing);
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(backing, bus.clone(), Roles::ALL).await;
    let (status, body) = app.generate("victim", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let real_key = body["api_key"].as_str().expect("key").to_owned();
    let real_id = body["key_id"].as_str().expect("id").to_owned();
    let listed = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM key_listing WHERE account_id = 'victim'")
                .fetch_one(&mut PgConnection::connect(&url).await.expect("db"))
                .await
                .expect("count");
        n
    };
    wait_for("the real key's listing row", || async {
        listed().await == 1
    })
    .await;
    let events = read_until(bus.events_topic(), |r| !r.is_empty()).await;
    let first = events[0].json();
    assert!(first["signature"].is_string(), "keyledger signs: {first}");
    let forged_key = format!("johndoe_v1_{}", STANDARD.encode([7u8; 33]));
    let intruder = LogSigner::from_base64(&LogSigner::generate_seed()).expect("seed");
    let p = kafka::producer();
    produce(
        &p,
        &bus.events_topic(),
        "victim",
        &forge(&first, 2, &forged_key, Some(&intruder)),
    )
    .await;

    // Every consumer refuses it (the projector and the index follower here), with the reason.
    let dead = read_until(bus.dead_letters_topic(), |r| r.len() >= 2).await;
    for d in &dead {
        let reason = d.json()["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains("forged"), "{reason}");
        assert_eq!(d.json()["topic"], json!(bus.events_topic()));
    }
    assert_eq!(app.verify(&forged_key, None).await["valid"], json!(false));
    assert_eq!(app.verify(&real_key, None).await["valid"], json!(true));
    assert_eq!(listed().await, 1, "the forged key is not listed");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("keyledger_events_refused_total"),
        "counted"
    );

    // The audit, with nothing secret, names the forged record.
    let (_, key) = crate::common::read(app.get_open("/v1/log-key").await).await;
    let report = audit_kafka(&url, &bus, key["public_key"].as_str().expect("pk")).await;
    let named = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .any(|f| f["check"] == "signature" && f["account_id"] == "victim" && f["sequence"] == 2);
    assert!(named, "{report}");

    // A forged, unsigned record far ahead cannot make the index ignore the real revocation.
    produce(
        &p,
        &bus.events_topic(),
        "victim",
        &forge(&first, 1000, &forged_key, None),
    )
    .await;
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/accounts/victim/keys/{real_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_for("the revocation to reach the index", || async {
        app.verify(&real_key, None).await["valid"] == json!(false)
    })
    .await;
    let unsigned = |r: &[crate::kafka::Record]| {
        r.iter().any(|d| {
            d.json()["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("no signature")
        })
    };
    let dead = read_until(bus.dead_letters_topic(), unsigned).await;
    assert!(
        unsigned(&dead),
        "the unsigned record is dead-lettered with its reason"
    );
}

/// Point 4: the bus over SASL/SCRAM and TLS against the real broker's secured listener
/// (scripts/broker: PORT+3 is SASL_SSL), with the secrets never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_runs_over_sasl_scram_and_tls() {
    let Some(dir) = std::env::var_os("KEYLEDGER_TEST_KAFKA_DIR") else {
        panic!("KEYLEDGER_TEST_KAFKA_DIR is not set: run the suite with scripts/test, which starts the broker with its SASL and TLS listeners");
    };
    let dir = std::path::PathBuf::from(dir);
    let port: u16 = std::fs::read_to_string(dir.join("port"))
        .expect("port file")
        .trim()
        .parse()
        .expect("port");
    let secured = |password: &str| {
        let mut bus = kafka::bus();
        bus.brokers = format!("127.0.0.1:{}", port + 3);
        bus.security = Security {
            protocol: Protocol::SaslSsl,
            sasl: Some(Sasl {
                mechanism: Mechanism::ScramSha512,
                username: "keyledger".into(),
                password: keyledger::domain::SecretString::new(password.into()),
            }),
            tls: Tls {
                ca_location: Some(dir.join("tls/ca.pem")),
                ..Tls::default()
            },
        };
        bus
    };
    let bus = secured("keyledger-test-secret");
    assert!(!format!("{bus:?}").contains("keyledger-test-secret"));
    let app = TestApp::spawn_bus(Backing::postgres().await, bus.clone(), Roles::ALL).await;
    let (status, body) = app.generate("acct-s", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The relay published it over TLS; read back on the plain listener.
    let events = read_until(bus.events_topic(), |r| !r.is_empty()).await;
    assert_eq!(events[0].json()["account_id"], "acct-s");
    // A command over the secured bus gets its answer there too.
    let (_, pk) = reply_key();
    let command_id = Uuid::new_v4();
    let secured_producer = {
        let mut c = bus.client_config();
        c.set("enable.idempotence", "true");
        c.create::<rdkafka::producer::FutureProducer>()
            .expect("producer")
    };
    let value = generate_envelope(command_id, "acct-s", "second", &pk);
    produce(&secured_producer, &bus.commands_topic(), "acct-s", &value).await;
    assert_eq!(first_result(&bus, command_id).await["status"], "accepted");

    // A wrong password: the service refuses to start, and says so without the password.
    let mut wrong = secured("not-the-password");
    wrong.topic_prefix = format!("{}x.", wrong.topic_prefix);
    let s = {
        let mut s = crate::common::settings_with(
            &Backing::postgres().await,
            Policy::default(),
            Some(wrong),
            Roles::ALL,
        );
        s.roles = Roles::ALL;
        s
    };
    let started = tokio::time::timeout(
        Duration::from_secs(120),
        keyledger::app::Application::build(s),
    )
    .await;
    match started {
        Ok(Ok(_)) => panic!("a wrong password must not start the bus"),
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            assert!(!text.contains("not-the-password"), "{text}");
        }
        Err(_) => panic!("a wrong password must fail, not hang"),
    }
}

/// Point 6: an idempotency key reused with another command is refused, over HTTP and the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_idempotency_key_with_another_command_is_refused() {
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(Backing::postgres().await, bus.clone(), Roles::ALL).await;
    let id = Uuid::new_v4().to_string();
    let post = |label: &'static str| {
        let req = app
            .http
            .post(app.url("/v1/accounts/acct-i/keys"))
            .bearer_auth(crate::common::TOKEN)
            .header("Idempotency-Key", &id)
            .json(&generate_body(label));
        async move { crate::common::read(req.send().await.expect("sent")).await }
    };
    assert_eq!(post("prod").await.0, StatusCode::CREATED);
    assert_eq!(post("prod").await.0, StatusCode::OK, "a true replay");
    let (status, body) = post("other").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    assert_eq!(app.event_count().await, 1, "one key, however often asked");

    let (_, pk) = reply_key();
    let command_id = Uuid::new_v4();
    let p = kafka::producer();
    let first = generate_envelope(command_id, "acct-j", "one", &pk);
    let second = generate_envelope(command_id, "acct-j", "two", &pk);
    produce(&p, &bus.commands_topic(), "acct-j", &first).await;
    produce(&p, &bus.commands_topic(), "acct-j", &second).await;
    let results = read_until(bus.results_topic(), move |r| {
        results_for(r, command_id).len() >= 2
    })
    .await;
    let results = results_for(&results, command_id);
    assert_eq!(results[0]["status"], "accepted");
    assert_eq!(results[1]["status"], "rejected", "{}", results[1]);
    assert_eq!(results[1]["error"]["code"], "idempotency_key_reused");
    assert!(
        results[1]["sealed_api_key"].is_null(),
        "never the earlier answer"
    );
}

/// Point 7: the process dies (SIGKILL) after RotateKey is committed and before its result is
/// published; the redelivered command answers with the same new key, sealed, and it verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_committed_before_a_crash_still_reaches_its_caller() {
    let backing = Backing::postgres().await;
    let url = database_url(&backing);
    let bus = kafka::bus();
    let mut service = spawn_process(&url, &bus, "all").await;
    let (sk, pk) = reply_key();
    let p = kafka::producer();
    let generate = Uuid::new_v4();
    produce(
        &p,
        &bus.commands_topic(),
        "acct-k",
        &generate_envelope(generate, "acct-k", "prod", &pk),
    )
    .await;
    let key_id = first_result(&bus, generate).await["key_id"].clone();

    // No result can be published from now on: the results topic is gone.
    let admin: rdkafka::admin::AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka::brokers())
        .create()
        .expect("admin");
    let opts = rdkafka::admin::AdminOptions::new();
    admin
        .delete_topics(&[&bus.results_topic()], &opts)
        .await
        .expect("delete");
    // Deletion finishes in the background: wait until the broker no longer knows the topic,
    // so the restarted service makes it anew rather than finding it half gone.
    let results_topic = bus.results_topic();
    wait_for("the results topic to be gone", || {
        let topic = results_topic.clone();
        async move {
            tokio::task::spawn_blocking(move || kafka::topic_exists(&topic))
                .await
                .map(|exists| !exists)
                .unwrap_or(false)
        }
    })
    .await;
    let rotate = Uuid::new_v4();
    let envelope = json!({
        "command_id": rotate, "account_id": "acct-k", "issued_by": "web-backend",
        "command": {"type": "RotateKey", "key_id": key_id, "label": "prod-2"},
        "reply_public_key": pk
    });
    produce(
        &p,
        &bus.commands_topic(),
        "acct-k",
        &serde_json::to_vec(&envelope).expect("json"),
    )
    .await;
    let mut db = PgConnection::connect(&url).await.expect("db");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rotated: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'KeyRotated'")
                .fetch_one(&mut db)
                .await
                .unwrap_or(0);
        if rotated == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the rotation is committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill9(&mut service).await;

    // Back up: the topic is made again, the command is delivered again.
    let mut service = spawn_process(&url, &bus, "all").await;
    let result = first_result(&bus, rotate).await;
    assert_eq!(result["status"], "duplicate", "{result}");
    let sealed = STANDARD
        .decode(
            result["sealed_api_key"]
                .as_str()
                .expect("a sealed key, not nothing"),
        )
        .expect("base64");
    let new_key = String::from_utf8(sk.unseal(&sealed).expect("opens")).expect("utf-8");
    kill9(&mut service).await;
    let reader = TestApp::spawn_bus(backing, bus, Roles::parse("http").expect("roles")).await;
    assert_eq!(reader.verify(&new_key, None).await["valid"], json!(true));
    let rotations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'KeyRotated'")
            .fetch_one(&mut db)
            .await
            .expect("count");
    assert_eq!(rotations, 1, "one rotation, answered twice");
}

/// Point 8: with the listing table locked, a DELETE's revocation is refused by verify at
/// once, before the listing write finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_the_index_while_the_listing_write_is_blocked() {
    let backing = Backing::postgres().await;
    let app = TestApp::spawn(backing.clone()).await;
    let (_, body) = app.generate("acct-b", "prod", &["ops@agency.gov.sg"]).await;
    let key = body["api_key"].as_str().expect("key").to_owned();
    let id = body["key_id"].as_str().expect("id").to_owned();
    let mut blocker = PgConnection::connect(&database_url(&backing))
        .await
        .expect("db");
    blocker.execute("BEGIN").await.expect("begin");
    blocker
        .execute("LOCK TABLE key_listing IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let delete = {
        let req = app
            .http
            .delete(app.url(&format!("/v1/accounts/acct-b/keys/{id}")))
            .bearer_auth(crate::common::TOKEN);
        tokio::spawn(async move { req.send().await.map(|r| r.status()) })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.verify(&key, None).await["valid"] != json!(false) {
        assert!(
            Instant::now() < deadline,
            "the index refuses the key at once"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!delete.is_finished(), "the listing write is still blocked");
    blocker.execute("COMMIT").await.expect("unlock");
    let status = delete.await.expect("task").expect("answer");
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// Point 9, over HTTP: a label holding a key is refused; /readyz says what is down, not why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_holding_keys_are_refused_and_readyz_tells_no_error_text() {
    let backing = Backing::postgres().await;
    let mut s = settings(&backing, Policy::default());
    s.metrics_listen = Some("127.0.0.1:0".into());
    let app = TestApp::spawn_settings(backing, s).await;
    let (_, body) = app.generate("acct-l", "prod", &["ops@agency.gov.sg"]).await;
    let key = body["api_key"].as_str().expect("key").to_owned();
    let (status, body) = app
        .generate("acct-l", &format!("old key {key}"), &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_label");
    assert!(!body.to_string().contains(&key[key.len() - 20..]), "{body}");
    // /metrics on its own listener, not on the API's.
    let metrics_addr = app.metrics_addr.expect("metrics listener");
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("scrape");
    assert_eq!(metrics.status(), StatusCode::OK);
    assert_eq!(
        app.get_open("/metrics").await.status(),
        StatusCode::NOT_FOUND
    );
    let (status, body) = crate::common::read(app.get_open("/readyz").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for check in body["checks"].as_object().expect("checks").values() {
        assert!(
            check.is_string() && check.as_str().is_some_and(|c| c.len() < 16),
            "{body}"
        );
    }
}

/// Point 9, on the bus: a result the broker cannot take goes to the dead letters (and
/// consumption goes on); a small-order reply key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_result_is_dead_lettered_and_weak_reply_keys_are_refused() {
    let bus = kafka::bus();
    let _app = TestApp::spawn_bus(Backing::postgres().await, bus.clone(), Roles::ALL).await;
    let admin: rdkafka::admin::AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka::brokers())
        .create()
        .expect("admin");
    let results_topic = bus.results_topic();
    let config =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&results_topic))
            .set("max.message.bytes", "64");
    admin
        .alter_configs(&[config], &rdkafka::admin::AdminOptions::new())
        .await
        .expect("alter");
    let p = kafka::producer();
    let (_, pk) = reply_key();
    let big = Uuid::new_v4();
    produce(
        &p,
        &bus.commands_topic(),
        "acct-o",
        &generate_envelope(big, "acct-o", "one", &pk),
    )
    .await;
    let dead = read_until(bus.dead_letters_topic(), |r| !r.is_empty()).await;
    let reason = dead[0].json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("result too large"), "{reason}");
    // Consumption goes on: the next command is handled (its answer dead-lettered likewise).
    let next = Uuid::new_v4();
    let zero = STANDARD.encode([0u8; 32]);
    produce(
        &p,
        &bus.commands_topic(),
        "acct-o",
        &generate_envelope(next, "acct-o", "two", &zero),
    )
    .await;
    let dead = read_until(bus.dead_letters_topic(), |r| r.len() >= 2).await;
    assert_eq!(dead.len(), 2);
    let config =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&results_topic))
            .set("max.message.bytes", "1048588");
    admin
        .alter_configs(&[config], &rdkafka::admin::AdminOptions::new())
        .await
        .expect("alter");
    let weak = Uuid::new_v4();
    produce(
        &p,
        &bus.commands_topic(),
        "acct-o",
        &generate_envelope(weak, "acct-o", "three", &zero),
    )
    .await;
    let result = &first_result(&bus, weak).await;
    assert_eq!(result["status"], "rejected", "{result}");
    assert!(
        result["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("reply_public_key"),
        "{result}"
    );
}

/// Point 9: an outbox row that cannot be read holds back its own account only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_row_stops_only_its_account() {
    let backing = Backing::postgres().await;
    let url = database_url(&backing);
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(backing, bus.clone(), Roles::ALL).await;
    let mut db = PgConnection::connect(&url).await.expect("db");
    // Hold the relay's view still while a broken row goes in ahead of the next commits.
    sqlx::query(
        "INSERT INTO outbox (aggregate_id, sequence, payload, metadata) \
         VALUES ('acct-broken', 1, '{\"KeyGenerated\": \"not an event\"}', '{}')",
    )
    .execute(&mut db)
    .await
    .expect("a broken row");
    let (status, _) = app
        .generate("acct-fine", "prod", &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let events = read_until(bus.events_topic(), |r| {
        r.iter().any(|e| e.json()["account_id"] == "acct-fine")
    })
    .await;
    assert!(events
        .iter()
        .all(|e| e.json()["account_id"] != "acct-broken"));
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("keyledger_relay_stuck_accounts_total"),
        "{metrics}"
    );
}

/// Point 9: an embedded store that holds keys never gets a new pepper silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pepper_is_never_silently_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = Backing::embedded(&dir);
    let embedded = |dir: &tempfile::TempDir| keyledger::config::Inputs {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().join("data"),
        database_url: None,
        pepper: None,
        api_token: Some(crate::common::TOKEN.into()),
        tokens_file: None,
        signing_key: None,
        previous_log_keys: Vec::new(),
        metrics_listen: None,
        policy: Policy::default(),
        default_from: None,
        max_db_connections: 4,
        legacy_salt: None,
        legacy_checks_per_second: 0.0,
        bus: None,
        roles: Roles::ALL,
        reminders: Default::default(),
        usage_flush: None,
    };
    let (settings, _) = keyledger::config::Settings::resolve(embedded(&dir)).expect("resolves");
    let app = TestApp::spawn_settings(backing.clone(), settings).await;
    let (status, _) = app.generate("acct-p", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED);
    drop(app);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_file(dir.path().join("data/pepper")).expect("pepper gone");
    let (settings, _) = keyledger::config::Settings::resolve(embedded(&dir)).expect("resolves");
    let refused = keyledger::app::Application::build(settings).await;
    let error = format!("{:#}", refused.err().expect("refuses to start"));
    assert!(error.contains("pepper"), "{error}");
}

/// Point 9: a token is never taken as a flag (it would show in `ps`).
#[tokio::test]
async fn the_cli_takes_no_token_on_the_command_line() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args([
            "keys",
            "list",
            "--account",
            "acct",
            "--token",
            "secret-in-ps",
        ])
        .output()
        .await
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token"), "{err}");
}

/// Point 5: made-up keys shaped like a migrated legacy key cannot burn the CPU or tell
/// which usernames have a legacy key. Keys of a username without a live legacy key run no
/// bcrypt at all; those of a username with one run bcrypt one at a time, rationed, and a
/// wrong key is tried once; both kinds of miss take the same padded time; the real legacy
/// key still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_legacy_keys_burn_no_cpu_and_tell_no_usernames() {
    let (plaintext, salt, tail) = crate::common::postman_legacy_key("marylim", 10);
    let (addr, _clock) = crate::common::spawn_with_legacy_cutoff_in_30_days(&salt).await;
    let http = reqwest::Client::new();
    let migrated = http
        .post(format!("http://{addr}/v1/accounts/legacy-acc/legacy-key"))
        .bearer_auth(crate::common::TOKEN)
        .json(&json!({"login_email": "mary.lim@agency.gov.sg", "legacy_hash": format!("marylim_v1_{tail}")}))
        .send()
        .await
        .expect("sent");
    assert_eq!(migrated.status(), StatusCode::CREATED);
    let bcrypt_runs = || async {
        let text = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| {
                l.starts_with("keyledger_legacy_checks_total")
                    && (l.contains("\"matched\"") || l.contains("\"missed\""))
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let made_up = |user: &str, i: u8| format!("{user}_v1_{}", STANDARD.encode([i; 33]));
    // Twenty at once for each username; each answer timed.
    let flood = |user: &'static str| {
        let http = http.clone();
        async move {
            let calls = (0..20u8).map(|i| {
                let (http, key) = (http.clone(), made_up(user, i));
                async move {
                    let started = Instant::now();
                    let answer: Value = http
                        .post(format!("http://{addr}/v1/verify"))
                        .bearer_auth(crate::common::TOKEN)
                        .json(&json!({ "api_key": key }))
                        .send()
                        .await
                        .expect("sent")
                        .json()
                        .await
                        .expect("json");
                    assert_eq!(answer["valid"], json!(false), "{answer}");
                    started.elapsed()
                }
            });
            let mut took = futures::future::join_all(calls).await;
            took.sort();
            took[took.len() / 2]
        }
    };
    let started = Instant::now();
    let without = flood("nolegacy").await;
    assert_eq!(
        bcrypt_runs().await,
        0,
        "no live legacy candidate, no bcrypt"
    );
    let with = flood("marylim").await;
    let runs = bcrypt_runs().await;
    let allowed = 4 + (started.elapsed().as_secs_f64() * 4.0).ceil() as u64;
    assert!(
        runs >= 1 && runs <= allowed,
        "{runs} bcrypt runs, at most {allowed} allowed"
    );
    // Timing tells nothing: both kinds of miss are padded to about a bcrypt.
    let (a, b) = (without.as_secs_f64(), with.as_secs_f64());
    assert!(
        a >= 0.02 && b >= 0.02,
        "misses are padded: {a:.3} s and {b:.3} s"
    );
    assert!(a / b < 3.0 && b / a < 3.0, "medians {a:.3} s and {b:.3} s");
    // A wrong key tried before is not tried again.
    let before = bcrypt_runs().await;
    for _ in 0..3 {
        let _ = flood("marylim").await;
    }
    assert!(
        bcrypt_runs().await - before <= 20 - runs.min(20),
        "only keys never tried before may run bcrypt"
    );
    // The real legacy key still verifies (a legitimate caller retries past the ration).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut valid = false;
    for _ in 0..10 {
        let answer: Value = http
            .post(format!("http://{addr}/v1/verify"))
            .bearer_auth(crate::common::TOKEN)
            .json(&json!({ "api_key": plaintext }))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        if answer["valid"] == json!(true) {
            valid = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(valid, "the real legacy key verifies");
}

/// The signing key rotated: events signed by the old key stay vouched for as long as its
/// public key is listed (`KEYLEDGER_PREVIOUS_LOG_KEYS`, `previous_public_keys` at
/// `/v1/log-key`, `audit --public-key NEW --public-key OLD`); the old key alone does not
/// vouch for what the new one signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_keeps_the_old_events_vouched_for() {
    let backing = Backing::postgres().await;
    let url = database_url(&backing);
    let bus = kafka::bus();
    let mut old = TestApp::spawn_bus(backing.clone(), bus.clone(), Roles::ALL).await;
    let (status, body) = old
        .generate("rotating", "before", &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let before_key = body["api_key"].as_str().expect("key").to_owned();
    let (_, old_log_key) = crate::common::read(old.get_open("/v1/log-key").await).await;
    let old_public = old_log_key["public_key"].as_str().expect("pk").to_owned();
    old.shutdown().await;

    let mut settings =
        crate::common::settings_with(&backing, Policy::default(), Some(bus.clone()), Roles::ALL);
    settings.signing_key = keyledger::domain::SecretString::new(LogSigner::generate_seed());
    settings.previous_log_keys =
        vec![keyledger_events::signature::LogKey::from_base64(&old_public).expect("pk")];
    let new = TestApp::spawn_settings(backing, settings).await;
    let (status, body) = new
        .generate("rotating", "after", &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let after_key = body["api_key"].as_str().expect("key").to_owned();
    let (_, log_key) = crate::common::read(new.get_open("/v1/log-key").await).await;
    let new_public = log_key["public_key"].as_str().expect("pk").to_owned();
    assert_ne!(new_public, old_public);
    assert_eq!(log_key["previous_public_keys"], json!([old_public]));
    for key in [&before_key, &after_key] {
        assert_eq!(new.verify(key, None).await["valid"], json!(true));
    }
    let events = read_until(bus.events_topic(), |r| r.len() >= 2).await;
    assert_eq!(events.len(), 2);
    wait_for("the projector to list both keys", || async {
        let mut db = PgConnection::connect(&url).await.expect("db");
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM key_listing WHERE account_id = 'rotating'")
                .fetch_one(&mut db)
                .await
                .expect("count");
        n == 2
    })
    .await;

    // Both keys listed: the audit passes. Only the new one: the old events are named.
    let audit = |keys: Vec<String>| {
        let (url, bus) = (url.clone(), bus.clone());
        async move {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyledger"));
            cmd.args(["audit", "--from", "kafka", "--json"]);
            for k in keys {
                cmd.args(["--public-key", &k]);
            }
            let out = cmd
                .env("KEYLEDGER_DATABASE_URL", url)
                .env("KEYLEDGER_KAFKA_BROKERS", &bus.brokers)
                .env("KEYLEDGER_TOPIC_PREFIX", &bus.topic_prefix)
                .output()
                .await
                .expect("audit runs");
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            (out.status.success(), report)
        }
    };
    let (passed, report) = audit(vec![new_public.clone(), old_public.clone()]).await;
    assert!(passed, "{report}");
    let (passed, report) = audit(vec![old_public]).await;
    assert!(!passed, "the new events are not the old key's: {report}");
}
