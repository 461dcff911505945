//! A consumer group whose offsets live in PostgreSQL: the plumbing every group consumer of
//! keyledger shares (command consumer, projector, reminder saga, notifier).
//!
//! rust-rdkafka's at-least-once consumer, with the offsets in the database next to the
//! effects instead of in Kafka:
//! - when partitions are assigned, each starts at the offset stored in PostgreSQL (read in
//!   the rebalance callback, before librdkafka fetches anything; 0 for a partition never
//!   read), so Kafka's group offsets and `auto.offset.reset` play no part;
//! - `auto.offset.reset=error`: a stored offset the log no longer holds is an error. The
//!   consumer then compares each assigned partition's start with the log's bounds and
//!   returns [`BusError::OutOfRange`] naming the partition and the missing records; the
//!   supervisor halts the part instead of letting librdkafka jump ahead;
//! - the caller records a record's offset only together with its effect (one transaction,
//!   or after the answer was acknowledged), so a crash repeats work and never skips it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use super::halt::{out_of_range, Halts};
use super::{BusConfig, BusError};
use crate::store::offsets;

/// What the rebalance callback learnt, for the consuming task.
pub struct GroupContext {
    consumer: String,
    topic: String,
    database: PgConnectOptions,
    /// Set by every assignment: the partitions and the offsets they start at.
    assigned: Mutex<Option<Vec<(i32, i64)>>>,
    /// The stored offsets could not be read at the last assignment.
    lookup_failed: AtomicBool,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    /// Assigns with the offsets stored in PostgreSQL; otherwise the default strategy.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.start_at_stored_offsets(tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = Some(vec![]);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::warn!(consumer = %self.consumer, error = %RDKafkaErrorCode::from(other), "rebalance error");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::warn!(consumer = %self.consumer, error = %e, "cannot apply a rebalance");
            self.lookup_failed.store(true, Ordering::SeqCst);
        }
    }
}

impl GroupContext {
    /// Sets each assigned partition's start to the stored offset. Runs on the thread that
    /// polls the consumer, so the database is asked on a thread of its own with its own
    /// connection (a task of the caller's runtime might be waiting on that very thread).
    fn start_at_stored_offsets(&self, tpl: &mut TopicPartitionList) {
        let (database, consumer, topic) = (
            self.database.clone(),
            self.consumer.clone(),
            self.topic.clone(),
        );
        let stored = std::thread::spawn(move || stored_offsets(&database, &consumer, &topic))
            .join()
            .unwrap_or_else(|_| Err("the offset lookup panicked".into()));
        let stored = match stored {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, error = %e, "cannot read the stored offsets; will join again");
                self.lookup_failed.store(true, Ordering::SeqCst);
                HashMap::new()
            }
        };
        let mut starts = Vec::new();
        for e in tpl.elements_for_topic(&self.topic) {
            let start = stored.get(&e.partition()).copied().unwrap_or(0);
            starts.push((e.partition(), start));
        }
        for (partition, start) in &starts {
            if let Err(e) =
                tpl.set_partition_offset(&self.topic, *partition, Offset::Offset(*start))
            {
                tracing::warn!(consumer = %self.consumer, partition, error = %e, "cannot set a start offset");
                self.lookup_failed.store(true, Ordering::SeqCst);
            }
        }
        tracing::info!(consumer = %self.consumer, partitions = ?starts, "partitions assigned");
        *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = Some(starts);
    }
}

/// Every stored next offset of `consumer` on `topic`, read over a connection of its own.
fn stored_offsets(
    database: &PgConnectOptions,
    consumer: &str,
    topic: &str,
) -> Result<HashMap<i32, i64>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let read = async {
            let mut c = PgConnection::connect_with(database).await?;
            let rows = offsets::load_all(&mut c, consumer, topic).await?;
            let _ = c.close().await;
            Ok::<_, sqlx::Error>(rows)
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(rows)) => Ok(rows.into_iter().collect()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    })
}

/// A member of a consumer group, reading one topic from the offsets stored in PostgreSQL.
pub struct Group {
    consumer: StreamConsumer<GroupContext>,
    pool: PgPool,
    name: String,
    topic: String,
    halts: Halts,
}

impl Group {
    /// Joins `name` on `topic`.
    pub fn join(
        bus: &BusConfig,
        pool: &PgPool,
        name: &str,
        topic: &str,
        halts: &Halts,
    ) -> Result<Self, BusError> {
        let mut c = bus.client_config();
        c.set("group.id", name)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100");
        let context = GroupContext {
            consumer: name.to_owned(),
            topic: topic.to_owned(),
            database: (*pool.connect_options()).clone(),
            assigned: Mutex::new(None),
            lookup_failed: AtomicBool::new(false),
        };
        let consumer: StreamConsumer<GroupContext> = c.create_with_context(context)?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer,
            pool: pool.clone(),
            name: name.to_owned(),
            topic: topic.to_owned(),
            halts: halts.clone(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next record, or `None` when nothing arrived within `idle`.
    pub async fn next(&self, idle: Duration) -> Result<Option<BorrowedMessage<'_>>, BusError> {
        self.check_assignment()?;
        match tokio::time::timeout(idle, self.consumer.recv()).await {
            Err(_) => {
                self.check_assignment()?;
                Ok(None)
            }
            Ok(Ok(m)) => Ok(Some(m)),
            Ok(Err(e)) => Err(self.classify(e).await),
        }
    }

    /// After an assignment: whether the offsets could be read, and whether each partition's
    /// start lies inside the log.
    fn check_assignment(&self) -> Result<(), BusError> {
        let context = self.consumer.context();
        if context.lookup_failed.swap(false, Ordering::SeqCst) {
            return Err(BusError::Topic(
                self.topic.clone(),
                "the stored offsets could not be read at assignment; joining again".into(),
            ));
        }
        let Some(starts) = context
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let problems = self.outside_the_log(&starts)?;
        if problems.is_empty() {
            self.halts.clear(&self.name);
            Ok(())
        } else {
            Err(BusError::OutOfRange(problems.join("; ")))
        }
    }

    /// The partitions (of `starts`) whose start offset the log does not hold.
    fn outside_the_log(&self, starts: &[(i32, i64)]) -> Result<Vec<String>, BusError> {
        let mut problems = Vec::new();
        for &(partition, start) in starts {
            let (low, high) = blocking(|| {
                self.consumer
                    .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
            })?;
            problems.extend(out_of_range(&self.topic, partition, start, low, high));
        }
        Ok(problems)
    }

    /// A consumption error; "offset out of range" (reported by librdkafka as an automatic
    /// reset it was told not to make) becomes [`BusError::OutOfRange`] with the details.
    async fn classify(&self, e: KafkaError) -> BusError {
        if e.rdkafka_error_code() != Some(RDKafkaErrorCode::AutoOffsetReset) {
            return BusError::Kafka(e);
        }
        let partitions: Vec<i32> = self
            .consumer
            .assignment()
            .map(|a| {
                a.elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect()
            })
            .unwrap_or_default();
        let mut starts = Vec::new();
        for partition in partitions {
            match offsets::load(&self.pool, &self.name, &self.topic, partition).await {
                Ok(stored) => starts.push((partition, stored)),
                Err(err) => return BusError::Sql(err),
            }
        }
        match self.outside_the_log(&starts) {
            Ok(problems) if !problems.is_empty() => BusError::OutOfRange(problems.join("; ")),
            _ => BusError::OutOfRange(format!(
                "{}: a partition's next offset is outside the log ({e})",
                self.topic
            )),
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

/// Whether a consumption error says an offset is outside the log.
pub fn is_out_of_range(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset)
}

/// Keeps `message`'s place: the next offset per partition of a batch.
pub fn note_offset(next: &mut Vec<(i32, i64)>, message: &BorrowedMessage<'_>) {
    let (partition, offset) = (message.partition(), message.offset());
    match next.iter_mut().find(|(p, _)| *p == partition) {
        Some(entry) => entry.1 = entry.1.max(offset + 1),
        None => next.push((partition, offset + 1)),
    }
}
