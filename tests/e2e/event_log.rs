//! The events topic as an event log on Apache Kafka: it must keep its events, a consumer
//! must never skip what the log lost, and the idempotent producers must deliver every
//! command exactly once in effect through a broker crash.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyledger::config::Roles;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::common::{read, Backing, TestApp, LOGIN, PEPPER, TOKEN};
use crate::kafka::{self, spawn_process_env, Record};

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyledger_refuses_an_events_topic_that_expires_its_events() {
    let url = crate::common::fresh_database().await;
    let bus = kafka::bus();
    let topic = bus.events_topic();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created =
        admin(&bus.brokers)
            .create_topics(
                &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))
                    .set("retention.ms", "86400000")],
                &opts,
            )
            .await
            .expect("create");
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
            .arg("serve")
            .env("KEYLEDGER_DATABASE_URL", &url)
            .env("KEYLEDGER_PEPPER", PEPPER)
            .env("KEYLEDGER_API_TOKEN", TOKEN)
            .env("KEYLEDGER_SIGNING_KEY", crate::common::SIGNING_KEY)
            .env("KEYLEDGER_KAFKA_BROKERS", &bus.brokers)
            .env("KEYLEDGER_TOPIC_PREFIX", &bus.topic_prefix)
            .env("KEYLEDGER_LISTEN", "127.0.0.1:0")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("keyledger exits instead of running")
    .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exits non-zero: {stderr}");
    assert!(stderr.contains(&topic), "names the topic: {stderr}");
    assert!(
        stderr.contains("retention.ms=86400000"),
        "names the setting: {stderr}"
    );
    assert!(
        stderr.contains("retention.ms=-1"),
        "names the fix: {stderr}"
    );
}

/// Deletes every record of `topic` (what retention does to a week-old log).
async fn delete_all_records(brokers: &str, topic: &str) -> i64 {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    let metadata = probe
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    let mut deleted = 0;
    for p in metadata.topics()[0].partitions() {
        let (low, high) = probe
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .expect("watermarks");
        deleted += high - low;
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(high))
            .expect("partition");
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin(brokers)
        .delete_records(&tpl, &opts)
        .await
        .expect("records deleted");
    deleted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_next_records_were_deleted_halts_instead_of_skipping() {
    // Keys generated while no projector runs: their events wait on the topic…
    let backing = Backing::postgres().await;
    let Backing::Postgres(url) = backing.clone() else {
        unreachable!()
    };
    let bus = kafka::bus();
    let writer = TestApp::spawn_bus(
        backing.clone(),
        bus.clone(),
        Roles::parse("http,commands,relay").expect("roles"),
    )
    .await;
    for i in 0..6 {
        let (status, body) = writer
            .generate(&format!("acct-{i}"), "prod", &["ops@agency.gov.sg"])
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let topic = bus.events_topic();
    let on_topic = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || {
            kafka::read_until(&topic, Duration::from_secs(60), |r| r.len() >= 6)
        })
        .await
        .expect("reader")
    };
    assert_eq!(on_topic.len(), 6);
    // …and are deleted before a projector ever read them.
    assert_eq!(delete_all_records(&bus.brokers, &topic).await, 6);

    let app = TestApp::spawn_bus(
        backing,
        bus.clone(),
        Roles::parse("http,projector").expect("roles"),
    )
    .await;
    let mut body = serde_json::Value::Null;
    for _ in 0..300 {
        let (status, b) = read(app.get_open("/readyz").await).await;
        body = b;
        if status == StatusCode::SERVICE_UNAVAILABLE
            && body["checks"]["consumers"]["keyledger-projector"].is_string()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body["checks"]["consumers"]["keyledger-projector"]
            .as_str()
            .is_some_and(|s| s.starts_with("halted")),
        "readyz names the halted projector: {body}"
    );
    // The index follower needs only what is published after its start (the index itself
    // comes from the store): the deleted records are not its concern, and it runs on.
    assert!(
        body["checks"]["consumers"]["index-follower"].is_null(),
        "{body}"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("keyledger_consumer_halted{consumer=\"keyledger-projector\"} 1"),
        "{metrics}"
    );
    let logs = crate::common::captured_logs();
    assert!(
        logs.contains("halted") && logs.contains("were deleted before they were read"),
        "the log says what is missing"
    );
    // Nothing was skipped: no offset moved past the hole, no listing row appeared.
    let mut db = PgConnection::connect(&url).await.expect("connect");
    let moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumer_offsets WHERE consumer = 'keyledger-projector'",
    )
    .fetch_one(&mut db)
    .await
    .expect("offsets");
    assert_eq!(
        moved, 0,
        "the projector recorded no offset past deleted records"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM key_listing")
        .fetch_one(&mut db)
        .await
        .expect("rows");
    assert_eq!(rows, 0);

    // The audit of the topic says history is missing, and from where.
    let audit = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["audit", "--from", "kafka", "--json"])
        .env("KEYLEDGER_KAFKA_BROKERS", &bus.brokers)
        .env("KEYLEDGER_TOPIC_PREFIX", &bus.topic_prefix)
        .env("KEYLEDGER_DATABASE_URL", &url)
        .output()
        .await
        .expect("audit runs");
    assert!(!audit.status.success(), "the audit fails");
    let report: serde_json::Value = serde_json::from_slice(&audit.stdout).expect("a JSON report");
    let findings = report["findings"].to_string();
    assert!(
        findings.contains("retention") && findings.contains("starts at offset"),
        "{findings}"
    );
}

/// A broker of this test's own (it gets killed): `scripts/broker` in a temporary folder.
struct OwnBroker {
    dir: tempfile::TempDir,
    address: String,
}

fn broker_script(args: &[&str]) -> String {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/broker"))
        .args(args)
        .output()
        .expect("scripts/broker runs");
    assert!(
        out.status.success(),
        "scripts/broker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl OwnBroker {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_string_lossy().into_owned();
        let address = broker_script(&["start", &path]);
        Self { dir, address }
    }
    fn path(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/broker"))
            .args(["kill", &self.path()])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_through_a_broker_crash_take_effect_exactly_once() {
    let broker = tokio::task::spawn_blocking(OwnBroker::start)
        .await
        .expect("broker");
    let url = crate::common::fresh_database().await;
    let mut bus = keyledger::kafka::BusConfig::new(broker.address.clone());
    bus.topic_prefix = "crash.".into();
    bus.partitions = 3;
    let _service = spawn_process_env(&url, &bus, "all", &[]).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "300000")
        .create()
        .expect("producer");
    // Wait for the service to create its topics.
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()
        .expect("probe");
    let started = Instant::now();
    while probe
        .fetch_metadata(Some(&bus.events_topic()), Duration::from_secs(2))
        .map(|m| m.topics()[0].partitions().is_empty())
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "topics created"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 300 commands at about 50 per second; the broker is SIGKILLed after two seconds and
    // started again (same data) three seconds later, while the sender carries on.
    let sk = crypto_box::SecretKey::generate(&mut rand::rngs::OsRng);
    let pk = STANDARD.encode(sk.public_key().as_bytes());
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::new_v4()).collect();
    let sends = {
        let (producer, ids, topic) = (producer.clone(), ids.clone(), bus.commands_topic());
        tokio::spawn(async move {
            let mut pending = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let account = format!("crash-{}", i % 30);
                let value = serde_json::to_vec(&json!({
                    "command_id": id, "account_id": account, "issued_by": "crash-test",
                    "command": {"type": "GenerateKey", "label": format!("k-{i}"),
                                "contacts": ["ops@agency.gov.sg"], "login_email": LOGIN},
                    "reply_public_key": pk,
                }))
                .expect("json");
                let (producer, topic) = (producer.clone(), topic.clone());
                pending.push(tokio::spawn(async move {
                    producer
                        .send(
                            FutureRecord::to(&topic).key(&account).payload(&value),
                            Duration::from_secs(300),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|(e, _)| e.to_string())
                }));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            futures::future::join_all(pending).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let path = broker.path();
    tokio::task::spawn_blocking(move || {
        broker_script(&["kill", &path]);
        std::thread::sleep(Duration::from_secs(3));
        broker_script(&["start", &path]);
    })
    .await
    .expect("broker restarted");
    for sent in sends.await.expect("sender") {
        sent.expect("joined")
            .expect("every command reached the broker");
    }

    // Every command gets a result; each has exactly one effect.
    let results_topic = bus.results_topic();
    let address = broker.address.clone();
    let wanted: BTreeSet<String> = ids.iter().map(Uuid::to_string).collect();
    let results = tokio::task::spawn_blocking(move || {
        read_all_until(&address, &results_topic, Duration::from_secs(180), |r| {
            let seen: BTreeSet<String> = r.iter().map(|x| x.key.clone()).collect();
            wanted.is_subset(&seen)
        })
    })
    .await
    .expect("reader");
    let answered: BTreeSet<String> = results.iter().map(|r| r.key.clone()).collect();
    let missing: Vec<String> = ids
        .iter()
        .map(Uuid::to_string)
        .filter(|id| !answered.contains(id))
        .collect();
    if !missing.is_empty() {
        panic!(
            "no result for {} commands: {}",
            missing.len(),
            where_commands_are(&broker.address, &bus.commands_topic(), &url, &missing).await
        );
    }
    let mut statuses: HashMap<String, Vec<String>> = HashMap::new();
    for r in &results {
        statuses
            .entry(r.key.clone())
            .or_default()
            .push(r.json()["status"].as_str().unwrap_or_default().to_owned());
    }
    for id in &ids {
        let s = statuses
            .get(&id.to_string())
            .expect("a result for every command");
        assert!(
            s.iter().all(|x| x == "accepted" || x == "duplicate"),
            "{id}: {s:?}"
        );
    }
    let mut db = PgConnection::connect(&url).await.expect("connect");
    let (events, commands): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT metadata->>'command_id') FROM events")
            .fetch_one(&mut db)
            .await
            .expect("count");
    assert_eq!(
        (events, commands),
        (300, 300),
        "exactly one event per command"
    );
    // And the listing, built from the events topic, has every key once.
    let mut listed = 0;
    for _ in 0..600 {
        listed = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM key_listing")
            .fetch_one(&mut db)
            .await
            .expect("count");
        if listed == 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed, 300);
}

/// [`kafka::read_until`] against another broker.
/// For a failure of the crash test: where the unanswered commands are on the commands
/// topic (or that they are not there), each partition's last offset and record count, and
/// the offsets the consumers stored — to tell a lost record from one never consumed.
async fn where_commands_are(brokers: &str, topic: &str, url: &str, missing: &[String]) -> String {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    let records = tokio::task::spawn_blocking(move || {
        kafka::read_from(&brokers, &topic, Duration::from_secs(20), |r| {
            r.len() >= 300
        })
    })
    .await
    .expect("reader");
    let mut out = format!("the commands topic holds {} records", records.len());
    let mut partitions: std::collections::BTreeMap<i32, (i64, usize)> = Default::default();
    for r in &records {
        let p = partitions.entry(r.partition).or_default();
        (p.0, p.1) = (p.0.max(r.offset), p.1 + 1);
        let id = r.json()["command_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if missing.contains(&id) {
            out.push_str(&format!("; {id} at {}:{}", r.partition, r.offset));
        }
    }
    out.push_str(&format!(
        "; per partition (last offset, records): {partitions:?}"
    ));
    if let Ok(mut db) = PgConnection::connect(url).await {
        let stored: Vec<(String, String, i32, i64)> = sqlx::query_as(
            "SELECT consumer, topic, partition, next_offset FROM consumer_offsets ORDER BY 1, 2, 3",
        )
        .fetch_all(&mut db)
        .await
        .unwrap_or_default();
        out.push_str(&format!("; stored offsets: {stored:?}"));
    }
    out
}

fn read_all_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    kafka::read_from(brokers, topic, timeout, done)
}
