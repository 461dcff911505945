//! Publishing one record and waiting for the broker's acknowledgement.
//!
//! Every producer of keyledger is idempotent (`acks=all`, see [`BusConfig::producer`]):
//! librdkafka retries a record until the broker has it, in order, without duplicates, and
//! through a broker restart (it bumps the producer epoch itself when an outcome is unknown,
//! which Apache Kafka follows). What the caller sees is the final outcome: delivered, or an
//! error after `message.timeout.ms` (10 minutes), after which it publishes again — the
//! relay from its outbox, the command consumer its unpublished answers, the notifier its
//! unpublished rows — and every consumer of keyledger's topics tolerates a repeated record.
//!
//! The one state librdkafka does not recover from is a *fatal* error of the idempotent
//! producer (the broker answered in a way that breaks the guarantee: a sequence gap, an
//! unknown producer id it cannot bump past). Every later send of that producer fails at
//! once, so a publisher that kept it would retry forever and publish nothing. A send that
//! fails on a fatal producer therefore replaces it with a new one (a new producer id): the
//! failed records are published again by their callers, as after any error, and counted
//! in `keyledger_producer_renewals_total`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{BusConfig, BusError};

/// An idempotent producer, cheap to clone (clones share it, and its replacement).
#[derive(Clone)]
pub struct Publisher {
    producer: Arc<RwLock<FutureProducer>>,
    bus: BusConfig,
    linger_ms: u32,
}

impl Publisher {
    /// `linger_ms`: how long a record may wait to share a batch (see [`BusConfig::producer`]).
    pub fn new(bus: &BusConfig, linger_ms: u32) -> Result<Self, BusError> {
        Ok(Self {
            producer: Arc::new(RwLock::new(bus.producer(linger_ms)?)),
            bus: bus.clone(),
            linger_ms,
        })
    }

    /// The producer in use (a clone of a handle: no lock is held across a send).
    fn current(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `failed` with a new producer when it is fatally broken (and no other clone
    /// has replaced it already). A producer that cannot be created leaves the old one, to
    /// be tried again on the next failure. The broken one is destroyed off the runtime's
    /// threads (librdkafka joins its own threads then).
    fn renew_if_fatal(&self, failed: FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if current.client().native_ptr() != failed.client().native_ptr() {
            // Another clone replaced it already; this may be the broken one's last handle.
            tokio::task::spawn_blocking(move || drop(failed));
            return;
        }
        match self.bus.producer(self.linger_ms) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut *current, fresh);
                drop(current);
                tokio::task::spawn_blocking(move || drop((old, failed)));
                crate::metrics::metrics().count("keyledger_producer_renewals_total", &[], 1);
                tracing::error!(?code, %reason, "the idempotent producer failed fatally; a new one takes over and the failed records are published again");
            }
            Err(e) => {
                tracing::error!(?code, %reason, error = %e, "the idempotent producer failed fatally and no new one could be created; trying again on the next failure");
            }
        }
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
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        // The queue wait: a full local queue (an outage under load) waits for room rather
        // than failing at once.
        let producer = self.current();
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => {
                self.renew_if_fatal(producer);
                Err(BusError::Kafka(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;

    use rdkafka::types::RDKafkaRespErr;

    use super::*;

    /// Needs the real broker scripts/test starts (as the end-to-end tests do).
    #[tokio::test]
    async fn a_fatally_failed_producer_is_replaced_and_publishing_goes_on() {
        let brokers = std::env::var("KEYLEDGER_TEST_KAFKA_BROKERS").expect(
            "KEYLEDGER_TEST_KAFKA_BROKERS is not set: run the suite with scripts/test, which starts the broker",
        );
        let mut bus = BusConfig::new(brokers);
        bus.topic_prefix = format!("pub{}.", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        bus.partitions = 1;
        bus.ensure_topics().await.expect("topics");
        let topic = bus.commands_topic();
        let publisher = Publisher::new(&bus, 0).expect("producer");
        let (_, first) = publisher
            .send(&topic, Some("k"), b"one")
            .await
            .expect("sent");

        // What librdkafka raises when the broker breaks the idempotence guarantee.
        let broken = publisher.current();
        let reason = CString::new("injected by the test").expect("no NUL");
        // SAFETY: the pointer is `broken`'s live client, which outlives the call.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                broken.client().native_ptr(),
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
        assert!(broken.client().fatal_error().is_some());
        assert!(
            publisher.send(&topic, Some("k"), b"two").await.is_err(),
            "a fatally failed producer publishes nothing"
        );
        let (_, again) = publisher
            .send(&topic, Some("k"), b"two")
            .await
            .expect("a new producer publishes");
        assert!(again > first, "{again} after {first}");
        let clone = publisher.clone();
        assert!(
            clone.current().client().native_ptr() != broken.client().native_ptr(),
            "clones share the replacement"
        );
    }
}
