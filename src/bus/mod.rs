//! The bus: Kafka topics in and out of keyledger.
//!
//! - [`relay`] publishes every committed event from the PostgreSQL outbox to the events
//!   topic, in per-account order, with the account's hash-chain value.
//! - [`commands`] consumes command envelopes, hands them to the command handler, and
//!   publishes one result per envelope (or a dead letter for what cannot be parsed).
//! - [`projector`] builds the listing table and the persisted verification index from the
//!   events topic; [`follower`] keeps each instance's in-memory index current from it.
//!
//! Consumer offsets live in PostgreSQL (`consumer_offsets`), written in the same
//! transaction as the effect they record; Kafka's own group offsets are not relied on.
//! Producers are idempotent; no Kafka transactions are used.

pub use crate::chain;
pub mod commands;
pub mod follower;
pub mod orphans;
pub mod projector;
pub mod publisher;
pub mod relay;
pub mod seal;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::FromClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Kafka settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub brokers: String,
    /// Prefix of every topic name (`keyledger.`).
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication: i32,
    /// Extra librdkafka settings (`key=value`), applied to every client.
    pub overrides: Vec<(String, String)>,
    /// Consumer group of the command consumer.
    pub commands_group: String,
    /// Consumer group of the projector.
    pub projector_group: String,
    /// Largest command envelope accepted, in bytes.
    pub max_command_bytes: usize,
    /// Most outbox rows the relay publishes per batch.
    pub relay_batch: i64,
    /// Most records the projector applies per transaction.
    pub projector_batch: usize,
}

impl BusConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "keyledger.".into(),
            partitions: 6,
            replication: 1,
            overrides: Vec::new(),
            commands_group: "keyledger-commands".into(),
            projector_group: "keyledger-projector".into(),
            max_command_bytes: 1024 * 1024,
            relay_batch: 1000,
            projector_batch: 500,
        }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    pub fn commands_topic(&self) -> String {
        self.topic("commands")
    }
    pub fn results_topic(&self) -> String {
        self.topic("command-results")
    }
    pub fn events_topic(&self) -> String {
        self.topic("events")
    }
    pub fn notifications_topic(&self) -> String {
        self.topic("notifications")
    }
    pub fn dead_letters_topic(&self) -> String {
        self.topic("dead-letters")
    }

    /// A client configuration with the brokers and the overrides.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", "keyledger");
        for (k, v) in &self.overrides {
            c.set(k, v);
        }
        c
    }

    /// An idempotent producer (acks=all, ordered retries). Never transactional. A record
    /// waits up to 10 minutes for the brokers: through an outage it is delivered late, not
    /// timed out (a timed-out batch also makes librdkafka bump the producer epoch, which
    /// tansu 0.6 cannot follow: its storage task panics on the next produce).
    /// `linger_ms`: how long a record may wait to share a batch (latency against
    /// throughput: 0 for answers someone waits on, a few ms for the relay's bulk).
    pub fn producer(&self, linger_ms: u32) -> Result<FutureProducer, BusError> {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
            .set("message.timeout.ms", "600000")
            .set("message.max.bytes", "16777216");
        for (k, v) in &self.overrides {
            c.set(k, v);
        }
        Ok(c.create()?)
    }

    /// A consumer outside any group, assigned every partition of `topic` from the offsets
    /// in `from` (partition, next offset), or from the beginning where none is given.
    pub fn reader<C: FromClientConfig + Consumer>(
        &self,
        topic: &str,
        from: &[(i32, i64)],
    ) -> Result<C, BusError> {
        let mut c = self.client_config();
        c.set(
            "group.id",
            format!("keyledger-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100");
        for (k, v) in &self.overrides {
            c.set(k, v);
        }
        let consumer: C = c.create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let offset = from
                    .iter()
                    .find(|(q, _)| *q == p.id())
                    .map(|(_, o)| Offset::Offset(*o))
                    .unwrap_or(Offset::Beginning);
                tpl.add_partition_offset(topic, p.id(), offset)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    }

    /// A client for health checks: [`BusProbe::ping`] asks the brokers for metadata.
    pub fn probe(&self) -> Result<BusProbe, BusError> {
        let consumer: rdkafka::consumer::BaseConsumer = self.client_config().create()?;
        Ok(BusProbe {
            consumer: std::sync::Arc::new(consumer),
            topic: self.events_topic(),
        })
    }

    /// Creates keyledger's topics when missing.
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let names = [
            (self.commands_topic(), self.partitions),
            (self.results_topic(), self.partitions),
            (self.events_topic(), self.partitions),
            (self.notifications_topic(), self.partitions),
            (self.dead_letters_topic(), 1),
        ];
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(self.replication)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&topics, &opts).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(BusError::Topic(topic, code.to_string())),
            }
        }
        Ok(())
    }
}

/// Runs `attempt` until it ends cleanly or `stop` turns true; a failed attempt (broker or
/// database away) is logged and retried with back-off (100 ms doubling to 5 s), so the
/// service keeps running through outages.
pub(crate) async fn supervise<F, Fut>(part: &str, mut stop: watch::Receiver<bool>, mut attempt: F)
where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = Result<(), BusError>>,
{
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        match attempt(stop.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(part, error = %e, "interrupted; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!(part, "stopped");
}

/// Answers whether the brokers answer (readiness).
#[derive(Clone)]
pub struct BusProbe {
    consumer: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    topic: String,
}

impl BusProbe {
    /// Metadata of the events topic within `timeout`, off the async threads.
    pub async fn ping(&self, timeout: Duration) -> Result<(), String> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot create topic {0}: {1}")]
    Topic(String, String),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
}
