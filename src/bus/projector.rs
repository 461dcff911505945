//! The projector: the listing table and the persisted verification index, built from the
//! events topic as one consumer group (`keyledger-projector`), both in the same transaction
//! per batch as the group's offsets (see `projection::from_topic`).

use std::sync::Arc;

use tokio::sync::watch;

use crate::projection::from_topic::{self, TopicFeed};
use crate::projection::Projection;
use crate::read_side::index::PersistedIndex;
use crate::read_side::listing::ListingTable;
use crate::store::Store;

/// Runs the projector until stopped.
pub async fn run(feed: TopicFeed, store: Arc<Store>, stop: watch::Receiver<bool>) {
    let group = feed.bus.projector_group.clone();
    let projections: Vec<Arc<dyn Projection>> =
        vec![Arc::new(ListingTable), Arc::new(PersistedIndex)];
    from_topic::follow(group, projections, feed, store, stop).await;
}
