//! Kafka plumbing, below every part that uses the bus: the client settings
//! ([`BusConfig`]), the topics and their settings ([`topics`]), the idempotent producer
//! ([`publisher`]), the consumer group whose offsets live in PostgreSQL ([`group`]), the
//! record of parts halted on an offset the log no longer holds ([`halt`]), and the
//! supervisor that keeps a part running through outages (`supervise`). The parts
//! themselves — relay, command consumer, projector, index follower — are in `bus/`.

pub mod group;
pub mod halt;
pub mod publisher;
pub mod security;
pub mod topics;

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Settings keyledger fixes for every client: the delivery and offset guarantees rest on
/// them, so `KEYLEDGER_KAFKA_OPTIONS` may not change them.
pub const FIXED_SETTINGS: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "transactional.id",
    "isolation.level",
    "group.id",
    "bootstrap.servers",
];

/// Kafka settings. `Debug` redacts every secret (see [`security`]).
#[derive(Clone)]
pub struct BusConfig {
    pub brokers: String,
    /// Prefix of every topic name (`keyledger.`).
    pub topic_prefix: String,
    pub partitions: i32,
    /// Replication factor of the topics keyledger creates.
    pub replication: i32,
    /// Retention of the commands, command-results and notifications topics (ms).
    pub retention_ms: i64,
    /// Retention of the dead-letters topic (ms).
    pub dead_letter_retention_ms: i64,
    /// Extra librdkafka settings (`key=value`), applied to every client; see
    /// [`BusConfig::with_overrides`].
    overrides: Vec<(String, String)>,
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
    /// SASL and TLS of every client.
    pub security: security::Security,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let overrides: Vec<(&str, &str)> = self
            .overrides
            .iter()
            .map(|(k, v)| {
                let shown = if security::is_secret_setting(k) {
                    "[redacted]"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("BusConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("retention_ms", &self.retention_ms)
            .field("dead_letter_retention_ms", &self.dead_letter_retention_ms)
            .field("overrides", &overrides)
            .field("commands_group", &self.commands_group)
            .field("projector_group", &self.projector_group)
            .field("max_command_bytes", &self.max_command_bytes)
            .field("relay_batch", &self.relay_batch)
            .field("projector_batch", &self.projector_batch)
            .field("security", &self.security)
            .finish()
    }
}

/// Seven days, Kafka's own default, for the topics that carry requests and answers.
pub const DEFAULT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Thirty days for the dead letters: long enough for an operator to look.
pub const DEFAULT_DEAD_LETTER_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

impl BusConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "keyledger.".into(),
            partitions: 6,
            replication: 1,
            retention_ms: DEFAULT_RETENTION_MS,
            dead_letter_retention_ms: DEFAULT_DEAD_LETTER_RETENTION_MS,
            overrides: Vec::new(),
            commands_group: "keyledger-commands".into(),
            projector_group: "keyledger-projector".into(),
            max_command_bytes: 1024 * 1024,
            relay_batch: 1000,
            projector_batch: 500,
            security: security::Security::default(),
        }
    }

    /// Adds librdkafka settings for every client (security, timeouts, tuning). The settings
    /// keyledger's guarantees rest on ([`FIXED_SETTINGS`]) are refused.
    pub fn with_overrides(mut self, overrides: Vec<(String, String)>) -> Result<Self, BusError> {
        for (k, _) in &overrides {
            if FIXED_SETTINGS.contains(&k.as_str()) {
                return Err(BusError::FixedSetting(k.clone()));
            }
        }
        self.overrides = overrides;
        Ok(self)
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
        self.security.apply(&mut c);
        for (k, v) in &self.overrides {
            c.set(k, v);
        }
        c
    }

    /// An idempotent producer (`acks=all`, retries that keep order and never duplicate).
    /// Never transactional. A record waits up to 10 minutes for the brokers: through an
    /// outage it is delivered late, not timed out.
    /// `linger_ms`: how long a record may wait to share a batch (latency against
    /// throughput: 0 for answers someone waits on, a few ms for the relay's bulk).
    pub fn producer(&self, linger_ms: u32) -> Result<FutureProducer, BusError> {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
            .set("message.timeout.ms", "600000");
        Ok(c.create()?)
    }

    /// A consumer outside any group, assigned every partition of `topic` from the offsets
    /// in `from` (partition, next offset), from offset 0 where none is given. An offset the
    /// log no longer holds is an error (`auto.offset.reset=error`), never a jump.
    pub fn reader<C: rdkafka::config::FromClientConfig + Consumer>(
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
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "100");
        let consumer: C = c.create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let offset = from
                    .iter()
                    .find(|(q, _)| *q == p.id())
                    .map(|(_, o)| *o)
                    .unwrap_or(0);
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(offset))?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(consumer)
    }

    /// The next offset to be written on each partition of `topic` (blocking). A topic
    /// created a moment ago may have no leaders yet: asked again for up to 30 s.
    pub fn end_offsets(&self, topic: &str) -> Result<Vec<(i32, i64)>, BusError> {
        let probe: rdkafka::consumer::BaseConsumer = self.client_config().create()?;
        let ask = || -> Result<Vec<(i32, i64)>, BusError> {
            let metadata = probe.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let mut ends = Vec::new();
            for t in metadata.topics() {
                for p in t.partitions() {
                    let (_, high) =
                        probe.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
                    ends.push((p.id(), high));
                }
            }
            if ends.is_empty() {
                return Err(BusError::Topic(
                    topic.to_owned(),
                    "no partitions yet".into(),
                ));
            }
            Ok(ends)
        };
        let started = std::time::Instant::now();
        loop {
            match ask() {
                Ok(ends) => return Ok(ends),
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    tracing::debug!(topic, error = %e, "end offsets not known yet");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A client for health checks: [`BusProbe::ping`] asks the brokers for metadata.
    pub fn probe(&self) -> Result<BusProbe, BusError> {
        let consumer: rdkafka::consumer::BaseConsumer = self.client_config().create()?;
        Ok(BusProbe {
            consumer: std::sync::Arc::new(consumer),
            topic: self.events_topic(),
        })
    }
}

/// `key=value` librdkafka settings, as given on the command line or in
/// `KEYLEDGER_KAFKA_OPTIONS`; an item without `=` is an error (its value is not echoed: it
/// may be a secret).
pub fn parse_options(options: &[String]) -> Result<Vec<(String, String)>, BusError> {
    options
        .iter()
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_owned(), v.trim().to_owned())),
            None => Err(BusError::Topic(
                "KEYLEDGER_KAFKA_OPTIONS".into(),
                "every item must be key=value".into(),
            )),
        })
        .collect()
}

/// Runs `attempt` until it ends cleanly or `stop` turns true; a failed attempt (broker or
/// database away) is logged and retried with back-off (100 ms doubling to 5 s), so the
/// service keeps running through outages. An offset that fell out of the log
/// ([`BusError::OutOfRange`]) is different: the part halts — it consumes nothing, says so
/// in the log, `/readyz` and `keyledger_consumer_halted` — and looks again every
/// [`halt::RECHECK`], so that an operator's repair takes effect without a restart. It never
/// skips ahead.
pub(crate) async fn supervise<F, Fut>(
    part: &str,
    halts: &halt::Halts,
    mut stop: watch::Receiver<bool>,
    mut attempt: F,
) where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = Result<(), BusError>>,
{
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        let result = attempt(stop.clone()).await;
        let wait = match result {
            Ok(()) => break,
            Err(BusError::OutOfRange(report)) => {
                tracing::error!(part, problem = %report, "halted: the log no longer holds what this part must read next; it will not skip ahead (docs/OPERATIONS.md, \"Offset out of range\")");
                halts.halted(part, &report);
                halt::RECHECK
            }
            Err(e) => {
                tracing::warn!(part, error = %e, "interrupted; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff / 2
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
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
    /// An existing topic whose settings would lose what keyledger keeps there.
    #[error("{0}")]
    TopicSettings(String),
    /// A stored offset the log no longer holds (or never held): nothing is skipped.
    #[error("offset out of range: {0}")]
    OutOfRange(String),
    #[error("KEYLEDGER_KAFKA_OPTIONS may not set {0}: keyledger fixes it (idempotent producers, offsets kept in PostgreSQL, no silent offset reset)")]
    FixedSetting(String),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
}
