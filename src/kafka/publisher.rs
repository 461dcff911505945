//! Publishing one record and waiting for the broker's acknowledgement.
//!
//! Every producer of keyledger is idempotent (`acks=all`, see [`BusConfig::producer`]):
//! librdkafka retries a record until the broker has it, in order, without duplicates, and
//! through a broker restart (it bumps the producer epoch itself when an outcome is unknown,
//! which Apache Kafka follows). What the caller sees is the final outcome: delivered, or an
//! error after `message.timeout.ms` (10 minutes), after which it publishes again — the
//! relay from its outbox, the command consumer its unpublished answers, the notifier its
//! unpublished rows — and every consumer of keyledger's topics tolerates a repeated record.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{BusConfig, BusError};

/// An idempotent producer, cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
}

impl Publisher {
    /// `linger_ms`: how long a record may wait to share a batch (see [`BusConfig::producer`]).
    pub fn new(bus: &BusConfig, linger_ms: u32) -> Result<Self, BusError> {
        Ok(Self {
            producer: bus.producer(linger_ms)?,
        })
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
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => Err(BusError::Kafka(e)),
        }
    }
}
