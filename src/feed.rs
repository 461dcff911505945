//! Feeding the log's reactions — the reminder saga and the notifier — with events.
//!
//! With the bus, a reaction is a consumer group on the events topic whose offsets are stored
//! with its effect ([`from_bus`]). Without it (the embedded default, or PostgreSQL alone) it
//! reads the event store: everything after its checkpoints at start, then each account a
//! commit names — this process's commits directly, other instances' through LISTEN/NOTIFY
//! ([`from_store`]). Either way the per-account checkpoints make applying an event twice
//! harmless.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{broadcast, watch};

use crate::bus::halt::Halts;
use crate::bus::projector::consume_batches;
use crate::bus::{supervise, BusConfig};
use crate::store::reactions::{Effect, Reactions};
use crate::store::{Store, StoreError, StoredRecord, REPLAY_PAGE};

/// Something that reacts to the event log, idempotently per (account, sequence).
pub trait Reaction: Send + Sync + 'static {
    /// Its consumer name: checkpoints, offsets and consumer group.
    fn name(&self) -> &'static str;

    fn reactions(&self) -> &Reactions;

    /// What an event does here.
    fn effect(&self) -> Effect<'_>;

    /// Applies a batch (each account's records in order), storing `offsets` with it.
    fn apply<'a>(
        &'a self,
        store: &'a Store,
        by_account: &'a [(String, Vec<StoredRecord>)],
        offsets: Option<(&'a str, &'a [(i32, i64)])>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a {
        async move {
            self.reactions()
                .apply(store, self.name(), by_account, &self.effect(), offsets)
                .await
        }
    }
}

/// Feeds `reaction` from the events topic until stopped, through outages.
pub async fn from_bus<R: Reaction>(
    reaction: Arc<R>,
    bus: BusConfig,
    store: Arc<Store>,
    pool: PgPool,
    halts: Halts,
    stop: watch::Receiver<bool>,
) {
    let topic = bus.events_topic();
    supervise(reaction.name(), &halts, stop, |s| {
        let (reaction, store, topic, halts) = (&reaction, &store, &topic, &halts);
        consume_batches(
            &bus,
            &pool,
            reaction.name(),
            halts,
            bus.projector_batch,
            s,
            move |batch, next| async move {
                reaction
                    .apply(store, &batch, Some((topic.as_str(), next.as_slice())))
                    .await?;
                Ok(())
            },
        )
    })
    .await;
}

/// Feeds `reaction` from the event store: a catch-up, then every account a commit names.
pub async fn from_store<R: Reaction>(
    reaction: Arc<R>,
    store: Arc<Store>,
    mut commits: broadcast::Receiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    let name = reaction.name();
    let mut listener = match store.listen().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(part = name, error = %e, "cannot LISTEN for other instances' commits");
            None
        }
    };
    let mut behind = true;
    loop {
        if behind {
            match catch_up_all(&*reaction, &store).await {
                Ok(()) => behind = false,
                Err(e) => {
                    tracing::warn!(part = name, error = %e, "cannot catch up with the event store; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => break,
                    }
                }
            }
        }
        let account = tokio::select! {
            _ = stop.changed() => break,
            c = commits.recv() => match c {
                Ok(account) => Some(account),
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            n = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await,
                    None => std::future::pending().await,
                }
            } => match n {
                Ok(Some(n)) => Some(n.payload().to_owned()),
                _ => None,
            },
        };
        match account {
            Some(account) => {
                if let Err(e) = catch_up_account(&*reaction, &store, &account).await {
                    tracing::warn!(part = name, account_id = %account, error = %e, "cannot apply new events; will catch up");
                    behind = true;
                }
            }
            // Missed notices (lagged, lost connection): read everything after the checkpoints.
            None => behind = true,
        }
    }
    tracing::info!(part = name, "stopped");
}

async fn catch_up_account<R: Reaction>(
    reaction: &R,
    store: &Store,
    account: &str,
) -> Result<(), StoreError> {
    let checkpoint = reaction
        .reactions()
        .checkpoint(reaction.name(), account)
        .await?;
    let records = store.events_after(account, checkpoint).await?;
    if records.is_empty() {
        return Ok(());
    }
    reaction
        .apply(store, &[(account.to_owned(), records)], None)
        .await
}

/// Pages through every stored event, applying what is past each account's checkpoint.
async fn catch_up_all<R: Reaction>(reaction: &R, store: &Store) -> Result<(), StoreError> {
    let mut after: Option<(String, u64)> = None;
    loop {
        let page = store
            .events_page(after.as_ref().map(|(a, s)| (a.as_str(), *s)), REPLAY_PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some((last.account_id.clone(), last.sequence));
        let mut by_account: Vec<(String, Vec<StoredRecord>)> = Vec::new();
        for record in page {
            match by_account.last_mut() {
                Some((a, records)) if *a == record.account_id => records.push(record),
                _ => by_account.push((record.account_id.clone(), vec![record])),
            }
        }
        reaction.apply(store, &by_account, None).await?;
    }
}
