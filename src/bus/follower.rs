//! The follower: keeps this instance's in-memory verification index current from the
//! events topic.
//!
//! Every instance needs every event, so it reads every partition (assigned, not in a
//! group). It starts from the end offsets taken *before* the index was brought up to date
//! from the store ([`crate::read_side::ReadSide::start`]): whatever was committed after
//! that catch-up is published after those offsets, and what both deliver is skipped by its
//! per-account sequence. An offset the log no longer holds halts the follower (nothing is
//! skipped; see [`crate::kafka::halt`]).

use std::sync::{Arc, Mutex};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio::sync::watch;

use crate::kafka::group::{blocking, is_out_of_range};
use crate::kafka::halt::{out_of_range, Halts};
use crate::kafka::{supervise, BusConfig, BusError};
use crate::projection::from_topic::Vouch;
use crate::read_side::ReadSide;

/// The name the follower goes by in logs, `/readyz` and metrics.
const PART: &str = "index-follower";

pub struct Follower {
    bus: BusConfig,
    read_side: Arc<ReadSide>,
    from: Mutex<Vec<(i32, i64)>>,
    halts: Halts,
    vouch: Vouch,
}

impl Follower {
    pub fn new(
        bus: BusConfig,
        read_side: Arc<ReadSide>,
        from: Vec<(i32, i64)>,
        halts: Halts,
        vouch: Vouch,
    ) -> Self {
        Self {
            bus,
            read_side,
            from: Mutex::new(from),
            halts,
            vouch,
        }
    }

    pub async fn run(self, stop: watch::Receiver<bool>) {
        supervise(PART, &self.halts, stop, |s| self.follow(s)).await;
    }

    async fn follow(&self, mut stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let topic = self.bus.events_topic();
        let from = self.from.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let consumer: StreamConsumer = self.bus.reader(&topic, &from)?;
        self.check_range(&consumer, &topic, &from)?;
        loop {
            let m = tokio::select! {
                m = consumer.recv() => match m {
                    Ok(m) => m,
                    Err(e) if is_out_of_range(&e) => {
                        let from = self.from.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        self.check_range(&consumer, &topic, &from)?;
                        return Err(BusError::OutOfRange(format!("{topic}: {e}")));
                    }
                    Err(e) => return Err(e.into()),
                },
                _ = stop.changed() => return Ok(()),
            };
            // Resume from here if the connection has to be re-established.
            {
                let mut from = self.from.lock().unwrap_or_else(|p| p.into_inner());
                match from.iter_mut().find(|(p, _)| *p == m.partition()) {
                    Some(entry) => entry.1 = m.offset() + 1,
                    None => from.push((m.partition(), m.offset() + 1)),
                }
            }
            // A record the log's key does not vouch for never reaches the index.
            match keyledger_events::decode_event(m.payload().unwrap_or_default()) {
                Ok(r) => {
                    if self.vouch.check(PART, &r, &m).await {
                        self.read_side
                            .apply_in_memory(&r.account_id, r.sequence, &r.event)
                    }
                }
                Err(e) => {
                    self.vouch
                        .refuse(PART, &format!("unreadable: {e}"), &m)
                        .await
                }
            }
        }
    }

    /// Whether every partition's next offset lies inside the log; clears a halt when so.
    fn check_range(
        &self,
        consumer: &StreamConsumer,
        topic: &str,
        from: &[(i32, i64)],
    ) -> Result<(), BusError> {
        let mut problems = Vec::new();
        for e in consumer.assignment()?.elements_for_topic(topic) {
            let start = from
                .iter()
                .find(|(p, _)| *p == e.partition())
                .map(|(_, o)| *o)
                .unwrap_or(0);
            let (low, high) = blocking(|| {
                consumer.fetch_watermarks(topic, e.partition(), std::time::Duration::from_secs(5))
            })?;
            problems.extend(out_of_range(topic, e.partition(), start, low, high));
        }
        if problems.is_empty() {
            self.halts.clear(PART);
            Ok(())
        } else {
            Err(BusError::OutOfRange(problems.join("; ")))
        }
    }
}
