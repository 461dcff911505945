//! keyledger's topics and their settings.
//!
//! The events topic is the log auditors replay and projections rebuild from: it must never
//! expire (a broker's default retention is 7 days on Apache Kafka) and never be compacted
//! (compaction keeps one record per key — one event per account). keyledger creates its
//! topics with the settings of `CONTRACT.md` ("Topics") and, when the events topic already
//! exists, refuses to start if its settings would lose events, naming the setting and the
//! fix. The other topics carry requests, answers and notifications and keep them for a
//! bounded time.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{BusConfig, BusError};

/// One topic keyledger creates: its name, partitions and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub settings: Vec<(&'static str, String)>,
}

impl BusConfig {
    /// The topics with their settings (`CONTRACT.md`, "Topics").
    pub fn topic_specs(&self) -> Vec<TopicSpec> {
        let replication = self.replication.max(1);
        let common = |retention_ms: i64, retention_bytes: i64| {
            vec![
                ("cleanup.policy", "delete".to_owned()),
                ("retention.ms", retention_ms.to_string()),
                ("retention.bytes", retention_bytes.to_string()),
                ("min.insync.replicas", replication.min(2).to_string()),
                ("unclean.leader.election.enable", "false".to_owned()),
            ]
        };
        let spec = |name: String, partitions: i32, settings| TopicSpec {
            name,
            partitions,
            settings,
        };
        vec![
            spec(self.events_topic(), self.partitions, common(-1, -1)),
            spec(
                self.commands_topic(),
                self.partitions,
                common(self.retention_ms, -1),
            ),
            spec(
                self.results_topic(),
                self.partitions,
                common(self.retention_ms, -1),
            ),
            spec(
                self.notifications_topic(),
                self.partitions,
                common(self.retention_ms, -1),
            ),
            spec(
                self.dead_letters_topic(),
                1,
                common(self.dead_letter_retention_ms, -1),
            ),
        ]
    }

    /// Creates keyledger's topics when missing, then checks that the events topic keeps
    /// its events (an existing one may have been created by hand or by an older release).
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let specs = self.topic_specs();
        let topics: Vec<NewTopic<'_>> = specs
            .iter()
            .map(|s| {
                s.settings.iter().fold(
                    NewTopic::new(
                        &s.name,
                        s.partitions,
                        TopicReplication::Fixed(self.replication.max(1)),
                    ),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&topics, &opts).await? {
            match result {
                Ok(topic) => tracing::info!(topic, "topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(BusError::Topic(topic, code.to_string())),
            }
        }
        self.check_event_log(&admin, &opts).await
    }

    /// Refuses an events topic that would lose events.
    async fn check_event_log(
        &self,
        admin: &AdminClient<DefaultClientContext>,
        opts: &AdminOptions,
    ) -> Result<(), BusError> {
        let topic = self.events_topic();
        let (retention_ms, retention_bytes, cleanup_policy) =
            self.event_log_settings(admin, opts).await?;
        match event_log_problem(&retention_ms, &retention_bytes, &cleanup_policy) {
            None => Ok(()),
            Some((setting, found, wanted)) => Err(BusError::TopicSettings(format!(
                "the events topic {topic} has {setting}={found}, so Kafka would delete events \
                 that auditors replay and projections rebuild from; keyledger refuses to run on it. \
                 Fix: kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics \
                 --entity-name {topic} --add-config {setting}={wanted} (and check the topic \
                 still starts at offset 0), then start keyledger again",
                brokers = self.brokers
            ))),
        }
    }

    /// The events topic's retention.ms, retention.bytes and cleanup.policy. A topic created
    /// a moment ago may not be described yet by the broker that answers: asked again for up
    /// to 10 s.
    async fn event_log_settings(
        &self,
        admin: &AdminClient<DefaultClientContext>,
        opts: &AdminOptions,
    ) -> Result<(String, String, String), BusError> {
        let topic = self.events_topic();
        let mut last = String::new();
        for _ in 0..100 {
            let described = admin
                .describe_configs([&ResourceSpecifier::Topic(&topic)], opts)
                .await?;
            match described.into_iter().next() {
                Some(Ok(resource)) => {
                    let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
                    if let (Some(ms), Some(bytes), Some(policy)) = (
                        value("retention.ms"),
                        value("retention.bytes"),
                        value("cleanup.policy"),
                    ) {
                        return Ok((ms, bytes, policy));
                    }
                    last = "its settings are not described yet".into();
                }
                Some(Err(code)) => last = code.to_string(),
                None => last = "no answer".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(BusError::Topic(
            topic,
            format!("cannot read its settings ({last}); keyledger needs DescribeConfigs on it"),
        ))
    }
}

/// What makes a topic unfit to hold the event log: (setting, value found, value wanted).
pub fn event_log_problem(
    retention_ms: &str,
    retention_bytes: &str,
    cleanup_policy: &str,
) -> Option<(&'static str, String, &'static str)> {
    let unlimited = |v: &str| v.trim().parse::<i64>().map(|n| n < 0).unwrap_or(false);
    if cleanup_policy.split(',').any(|p| p.trim() == "compact") {
        return Some(("cleanup.policy", cleanup_policy.to_owned(), "delete"));
    }
    if !unlimited(retention_ms) {
        return Some(("retention.ms", retention_ms.to_owned(), "-1"));
    }
    if !unlimited(retention_bytes) {
        return Some(("retention.bytes", retention_bytes.to_owned(), "-1"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_log_keeps_everything_and_is_never_compacted() {
        assert_eq!(event_log_problem("-1", "-1", "delete"), None);
        assert_eq!(
            event_log_problem("604800000", "-1", "delete").map(|p| p.0),
            Some("retention.ms")
        );
        assert_eq!(
            event_log_problem("-1", "1073741824", "delete").map(|p| p.0),
            Some("retention.bytes")
        );
        assert_eq!(
            event_log_problem("-1", "-1", "compact,delete").map(|p| p.0),
            Some("cleanup.policy")
        );
        assert_eq!(
            event_log_problem("", "-1", "delete").map(|p| p.0),
            Some("retention.ms"),
            "an unreadable value is not taken for unlimited"
        );
    }

    #[test]
    fn the_topics_follow_the_contract() {
        let mut bus = BusConfig::new("127.0.0.1:9092");
        bus.replication = 3;
        let specs = bus.topic_specs();
        let events = &specs[0];
        assert_eq!(events.name, "keyledger.events");
        let get = |s: &TopicSpec, k: &str| {
            s.settings
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get(events, "retention.ms").as_deref(), Some("-1"));
        assert_eq!(get(events, "retention.bytes").as_deref(), Some("-1"));
        assert_eq!(get(events, "cleanup.policy").as_deref(), Some("delete"));
        assert_eq!(get(events, "min.insync.replicas").as_deref(), Some("2"));
        assert_eq!(
            get(events, "unclean.leader.election.enable").as_deref(),
            Some("false")
        );
        for s in &specs[1..4] {
            assert_eq!(
                get(s, "retention.ms").as_deref(),
                Some("604800000"),
                "{}",
                s.name
            );
        }
        assert_eq!(specs[4].name, "keyledger.dead-letters");
        assert_eq!(
            get(&specs[4], "retention.ms").as_deref(),
            Some("2592000000")
        );
        bus.replication = 1;
        assert_eq!(
            get(&bus.topic_specs()[0], "min.insync.replicas").as_deref(),
            Some("1")
        );
    }
}
