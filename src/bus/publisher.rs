//! Publishing that survives a producer which can no longer deliver.
//!
//! A producer can stop delivering for good: after an outage that leaves a produce request's
//! outcome unknown, librdkafka's idempotent producer may bump its epoch on its own, and a
//! broker that cannot follow (tansu 0.6) never acknowledges it again. So a producer whose
//! record is not delivered within [`STUCK_AFTER`] is purged and replaced by a fresh one (a
//! new producer id). The sends it held fail, and their callers publish again — every caller
//! already publishes at least once (the relay from its outbox, the command consumer its
//! unpublished answers, the notifier its unpublished rows), and every consumer of
//! keyledger's topics tolerates a repeated record. (This does not save tansu itself when
//! the bumped producer reaches it first; there, run without idempotence — see
//! docs/ARCHITECTURE.md, "Known limits".)

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};

use super::{BusConfig, BusError};

/// How long a record may wait for its delivery before its producer counts as stuck. Longer
/// than any delivery of a healthy broker under load; an outage longer than this merely
/// replaces a producer that was waiting anyway.
pub const STUCK_AFTER: Duration = Duration::from_secs(15);

/// A producer (idempotent, never transactional) that replaces itself when stuck.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    bus: BusConfig,
    linger_ms: u32,
    /// (generation, producer): the generation tells concurrent senders whether the
    /// producer they saw stuck has already been replaced.
    current: RwLock<(u64, FutureProducer)>,
}

impl Publisher {
    /// `linger_ms`: how long a record may wait to share a batch (see [`BusConfig::producer`]).
    pub fn new(bus: &BusConfig, linger_ms: u32) -> Result<Self, BusError> {
        Ok(Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                linger_ms,
                current: RwLock::new((0, bus.producer(linger_ms)?)),
            }),
        })
    }

    fn current(&self) -> (u64, FutureProducer) {
        let guard = self.inner.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Publishes one record and waits for the broker's acknowledgement; returns its
    /// partition and offset. An error means the record may or may not be on the topic:
    /// publish it again.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
    ) -> Result<(i32, i64), BusError> {
        let (generation, producer) = self.current();
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        match tokio::time::timeout(STUCK_AFTER, producer.send(record, Duration::from_secs(30)))
            .await
        {
            Ok(Ok(d)) => Ok((d.partition, d.offset)),
            Ok(Err((e, _))) => Err(BusError::Kafka(e)),
            Err(_) => {
                drop(producer);
                self.replace(generation);
                Err(BusError::Topic(
                    topic.to_owned(),
                    format!(
                        "no acknowledgement within {} s; producer replaced",
                        STUCK_AFTER.as_secs()
                    ),
                ))
            }
        }
    }

    /// Replaces the producer of `generation` (once, however many senders saw it stuck).
    fn replace(&self, generation: u64) {
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            return;
        }
        match self.inner.bus.producer(self.inner.linger_ms) {
            Ok(fresh) => {
                let stuck = std::mem::replace(&mut current.1, fresh);
                current.0 += 1;
                // Whatever it still holds fails now instead of at the message timeout.
                stuck.purge(PurgeConfig::default().queue().inflight());
                crate::metrics::metrics().count("keyledger_producers_replaced_total", &[], 1);
                tracing::warn!(
                    generation = current.0,
                    "a producer delivered nothing for {} s; replaced by a fresh one",
                    STUCK_AFTER.as_secs()
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a fresh producer; keeping the old one")
            }
        }
    }
}
