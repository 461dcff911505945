//! Partitions nobody consumes. tansu 0.6 keeps a killed member of a consumer group with its
//! partitions (or hands a restarted member none at all) and never rebalances by itself; a
//! consumer that notices records waiting on partitions no member advances leaves and joins
//! the group again, which makes the coordinator hand them out anew. Used by every group
//! consumer (commands, projector, saga, notifier).

use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use sqlx::PgPool;

use super::commands::RebalanceFlag;
use super::BusError;
use crate::store::offsets;

/// How often a consumer looks for partitions nobody consumes, and how long a partition may
/// stand still with records waiting before the consumer leaves and joins the group again:
/// soon when this member (having been through a rebalance) holds no partition at all,
/// later when another member holds it (it may merely be slow).
const ORPHAN_CHECK_EVERY: Duration = Duration::from_secs(3);
const ORPHANED_AFTER_WHEN_EMPTY: Duration = Duration::from_secs(3);
const ORPHANED_AFTER: Duration = Duration::from_secs(20);
/// How long the topic's partition list is trusted before it is asked for again.
const PARTITIONS_KEPT: Duration = Duration::from_secs(60);

/// Notices partitions of the topic that no member of the group consumes: not assigned to
/// this member, records waiting past the group's stored offset, and that offset standing
/// still. tansu 0.6 keeps a killed member in the group with its partitions (or hands a
/// restarted member none at all) and never rebalances by itself; joining again makes the
/// coordinator hand them out anew. Against Apache Kafka this never fires. A member that
/// holds every partition asks the broker nothing.
pub struct OrphanWatch {
    created: std::time::Instant,
    checked: std::time::Instant,
    partitions: Option<(std::time::Instant, Vec<i32>)>,
    suspect: Option<(std::time::Instant, Vec<(i32, i64)>)>,
}

impl Default for OrphanWatch {
    fn default() -> Self {
        Self {
            created: std::time::Instant::now(),
            checked: std::time::Instant::now(),
            partitions: None,
            suspect: None,
        }
    }
}

/// Runs a blocking broker call without stalling the other tasks of a multi-threaded
/// runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl OrphanWatch {
    /// Cheap unless a check is due; an error asks the caller to join the group again.
    pub async fn check(
        &mut self,
        pool: &PgPool,
        consumer: &StreamConsumer<RebalanceFlag>,
        group: &str,
        topic: &str,
    ) -> Result<(), BusError> {
        if self.checked.elapsed() < ORPHAN_CHECK_EVERY {
            return Ok(());
        }
        self.checked = std::time::Instant::now();
        let Ok(assignment) = consumer.assignment() else {
            return Ok(());
        };
        let assigned: std::collections::HashSet<i32> = assignment
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        if self
            .partitions
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= PARTITIONS_KEPT)
        {
            let listed = blocking(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(1)));
            let Ok(metadata) = listed else {
                return Ok(());
            };
            let ids = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            self.partitions = Some((std::time::Instant::now(), ids));
        }
        let unheld: Vec<i32> = self
            .partitions
            .as_ref()
            .map(|(_, ids)| {
                ids.iter()
                    .copied()
                    .filter(|p| !assigned.contains(p))
                    .collect()
            })
            .unwrap_or_default();
        if unheld.is_empty() {
            self.suspect = None;
            return Ok(());
        }
        // Brief blocking calls to the broker; when it cannot answer, nothing is concluded.
        let highs = blocking(|| {
            unheld
                .iter()
                .map(|&p| {
                    consumer
                        .fetch_watermarks(topic, p, Duration::from_secs(1))
                        .map(|(_, high)| (p, high))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        let Ok(highs) = highs else {
            return Ok(());
        };
        // A member still joining holds nothing yet: judge it only once it has been through a
        // rebalance (tansu may hand it nothing), or when joining takes unreasonably long.
        let joined = consumer.context().joined.load(Ordering::SeqCst)
            || self.created.elapsed() >= ORPHANED_AFTER;
        let patience = if joined && assigned.is_empty() {
            ORPHANED_AFTER_WHEN_EMPTY
        } else {
            ORPHANED_AFTER
        };
        let mut behind = Vec::new();
        for (partition, high) in highs {
            let stored = offsets::load(pool, group, topic, partition).await?;
            if stored < high {
                behind.push((partition, stored));
            }
        }
        match &self.suspect {
            _ if behind.is_empty() => self.suspect = None,
            Some((since, before)) if *before == behind => {
                if since.elapsed() >= patience {
                    let partitions: Vec<i32> = behind.iter().map(|(p, _)| *p).collect();
                    return Err(BusError::Topic(
                        topic.to_owned(),
                        format!("partitions {partitions:?} are consumed by no member; joining the group again"),
                    ));
                }
            }
            _ => self.suspect = Some((std::time::Instant::now(), behind)),
        }
        Ok(())
    }
}
