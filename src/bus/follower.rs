//! The follower: keeps this instance's in-memory verification index current from the
//! events topic.
//!
//! At start it loads the persisted index and the projector's offsets from one PostgreSQL
//! snapshot, then reads every partition of the events topic from those offsets (assigned,
//! not in a group: every instance needs every event). Each event is folded in; what the
//! index already has is skipped by its per-account sequence.

use std::sync::{Arc, Mutex};

use keyledger_projections::VerificationIndex;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use tokio::sync::watch;

use super::projector::parse_event;
use super::{supervise, BusConfig, BusError};
use crate::read_side::ReadSide;
use crate::store::{index_snapshot, Store};

/// Loads the persisted index into `read_side`; returns the offsets to follow from.
pub async fn load_index(
    bus: &BusConfig,
    store: &Store,
    read_side: &ReadSide,
) -> Result<Vec<(i32, i64)>, BusError> {
    let snapshot = index_snapshot(store, &bus.projector_group, &bus.events_topic()).await?;
    let mut index = VerificationIndex::new();
    index.reserve(snapshot.rows.len());
    for (account, login, applied) in &snapshot.accounts {
        index.restore_account(account, login, *applied);
    }
    for r in &snapshot.rows {
        index.restore_key(
            &r.account_id,
            r.key_id,
            r.key_hash.as_deref(),
            r.legacy_hash.as_deref(),
            &r.label,
            r.expires_at,
            &r.status,
        );
    }
    index.shrink_to_fit();
    tracing::info!(
        keys = snapshot.rows.len(),
        accounts = snapshot.accounts.len(),
        "verification index loaded"
    );
    read_side.install(index);
    Ok(snapshot.offsets)
}

pub struct Follower {
    bus: BusConfig,
    read_side: Arc<ReadSide>,
    from: Mutex<Vec<(i32, i64)>>,
}

impl Follower {
    pub fn new(bus: BusConfig, read_side: Arc<ReadSide>, from: Vec<(i32, i64)>) -> Self {
        Self {
            bus,
            read_side,
            from: Mutex::new(from),
        }
    }

    pub async fn run(self, stop: watch::Receiver<bool>) {
        supervise("index follower", stop, |s| self.follow(s)).await;
    }

    async fn follow(&self, mut stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let topic = self.bus.events_topic();
        let from = self.from.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let consumer: StreamConsumer = self.bus.reader(&topic, &from)?;
        loop {
            let m = tokio::select! {
                m = consumer.recv() => m?,
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
            match parse_event(m.payload().unwrap_or_default()) {
                Ok(r) => self
                    .read_side
                    .apply_in_memory(&r.account_id, r.sequence, &r.event),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable record on the events topic; skipped")
                }
            }
        }
    }
}
