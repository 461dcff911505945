//! Helpers for tests against the real broker (Apache Kafka, started by scripts/test): topic names per test, a plain producer, a reader of whole topics, and the
//! service as separate processes that can be killed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use keyledger::config::Roles;
use keyledger::kafka::BusConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::process::{Child, Command};

use crate::common::{PEPPER, TOKEN};

/// The broker the suite runs against.
pub fn brokers() -> String {
    std::env::var("KEYLEDGER_TEST_KAFKA_BROKERS")
        .expect("KEYLEDGER_TEST_KAFKA_BROKERS is not set: run the suite with scripts/test, which starts the broker")
}

/// A bus configuration with topics of its own (a fresh prefix per test).
pub fn bus() -> BusConfig {
    let mut bus = BusConfig::new(brokers());
    bus.topic_prefix = format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    bus.partitions = 3;
    bus.max_command_bytes = 1024 * 1024;
    bus
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
        .expect("producer")
}

pub async fn produce(p: &FutureProducer, topic: &str, key: &str, value: &[u8]) {
    p.send(
        FutureRecord::to(topic).key(key).payload(value),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("produced");
}

/// One record read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Vec<u8>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads `topic` from the beginning until `done(records)` or `timeout`.
pub fn read_until(topic: &str, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    read_from(&brokers(), topic, timeout, done)
}

/// As [`read_until`], from the broker at `brokers`.
pub fn read_from(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .expect("consumer");
    let started = Instant::now();
    // A topic made a moment ago may not be in the metadata yet: ask until it has partitions.
    let mut tpl = TopicPartitionList::new();
    while tpl.count() == 0 && started.elapsed() < timeout {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        if tpl.count() == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    while started.elapsed() < timeout && !done(&records) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            records.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                value: m.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    records
}

/// Whether the broker's metadata lists `topic` (with partitions).
pub fn topic_exists(topic: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("consumer");
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map(|m| {
            m.topics()
                .iter()
                .any(|t| t.error().is_none() && !t.partitions().is_empty())
        })
        .unwrap_or(true)
}

/// The service as a real process (so it can be SIGKILLed).
pub async fn spawn_process(database_url: &str, bus: &BusConfig, roles: &str) -> Child {
    spawn_process_env(database_url, bus, roles, &[]).await
}

/// As [`spawn_process`], with more environment.
pub async fn spawn_process_env(
    database_url: &str,
    bus: &BusConfig,
    roles: &str,
    env: &[(&str, String)],
) -> Child {
    let _ = Roles::parse(roles).expect("valid roles");
    Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .arg("serve")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("KEYLEDGER_DATABASE_URL", database_url)
        .env("KEYLEDGER_PEPPER", PEPPER)
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .env("KEYLEDGER_SIGNING_KEY", crate::common::SIGNING_KEY)
        .env("KEYLEDGER_KAFKA_BROKERS", &bus.brokers)
        .env("KEYLEDGER_TOPIC_PREFIX", &bus.topic_prefix)
        .env("KEYLEDGER_KAFKA_PARTITIONS", bus.partitions.to_string())
        .env("KEYLEDGER_ROLES", roles)
        .env("KEYLEDGER_RELAY_BATCH", bus.relay_batch.to_string())
        .env("KEYLEDGER_PROJECTOR_BATCH", bus.projector_batch.to_string())
        .env("KEYLEDGER_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "keyledger=info")
        .stdout(Stdio::null())
        // KEYLEDGER_TEST_LOG=1 shows the process's log with the test's.
        .stderr(if std::env::var_os("KEYLEDGER_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("keyledger runs")
}

/// SIGKILL, no goodbye.
pub async fn kill9(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let _ = child.wait().await;
}
