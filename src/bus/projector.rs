//! The projector: the listing table and the persisted verification index, built from the
//! events topic as one consumer group (`keyledger-projector`), both in the same transaction
//! per batch as the group's offsets (see `projection::from_topic`).

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::kafka::halt::Halts;
use crate::kafka::BusConfig;
use crate::projection::from_topic::{self, Vouch};
use crate::projection::Projection;
use crate::read_side::index::PersistedIndex;
use crate::read_side::listing::ListingTable;
use crate::store::Store;

/// Runs the projector until stopped.
pub async fn run(
    bus: BusConfig,
    store: Arc<Store>,
    pool: PgPool,
    halts: Halts,
    vouch: Vouch,
    stop: watch::Receiver<bool>,
) {
    let group = bus.projector_group.clone();
    let projections: Vec<Arc<dyn Projection>> =
        vec![Arc::new(ListingTable), Arc::new(PersistedIndex)];
    from_topic::follow(group, projections, bus, store, pool, halts, vouch, stop).await;
}
