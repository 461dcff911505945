//! Feeding projections from the event store (no bus, or the embedded default).
//!
//! At start everything after the projections' checkpoints is applied, page by page; then
//! each account a commit names — this process's commits directly, other instances' through
//! PostgreSQL's LISTEN/NOTIFY — is caught up from its checkpoint. Listening starts before
//! the catch-up, so a commit in between is not missed; a notice that may have been lost
//! (a lagging receiver, a dropped connection) means another full catch-up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::{apply, Projection};
use crate::store::{checkpoints, Store, StoreError, StoredRecord};

/// Feeds `projection` from the event store until stopped.
pub async fn follow(
    projection: Arc<dyn Projection>,
    store: Arc<Store>,
    mut commits: broadcast::Receiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    let name = projection.name();
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
            let caught = match store.account_heads().await {
                Ok(heads) => catch_up_all(&store, &[&*projection], &heads).await,
                Err(e) => Err(e),
            };
            match caught {
                Ok(_) => behind = false,
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
                if let Err(e) = catch_up_account(&store, &*projection, &account).await {
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

/// Applies what `projection` has not seen of one account.
pub async fn catch_up_account(
    store: &Store,
    projection: &dyn Projection,
    account: &str,
) -> Result<(), StoreError> {
    let checkpoint = checkpoints::get(store, projection.name(), account).await?;
    let records = store.events_after(account, checkpoint).await?;
    if records.is_empty() {
        return Ok(());
    }
    apply(store, &[projection], &[(account.to_owned(), records)], None).await
}

/// Applies every stored event the projections have not seen; returns how many events
/// were applied. Which accounts are behind follows from each account's head (`heads`,
/// from [`Store::account_heads`]) and the checkpoints, so a current projection costs no
/// read of the log; when
/// much of the log is new (a first start on an imported history) it is read in one pass,
/// a transaction per page, else account by account.
pub async fn catch_up_all(
    store: &Store,
    projections: &[&dyn Projection],
    heads: &[(String, u64)],
) -> Result<u64, StoreError> {
    let mut at = Vec::with_capacity(projections.len());
    for p in projections {
        at.push(checkpoints::all(store, p.name()).await?);
    }
    let lowest = |account: &str| {
        at.iter()
            .map(|c| c.get(account).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    };
    let behind: Vec<(&str, u64)> = heads
        .iter()
        .filter_map(|(account, head)| {
            let applied = lowest(account);
            (*head > applied).then_some((account.as_str(), applied))
        })
        .collect();
    let mut applied = 0u64;
    if behind.len() > 1000 {
        let mut pages = store.pages();
        while let Some(page) = pages.next().await? {
            let todo: Vec<(String, Vec<StoredRecord>)> = page
                .into_iter()
                .filter_map(|(account, records)| {
                    let lowest = lowest(&account);
                    let rest: Vec<StoredRecord> = records
                        .into_iter()
                        .filter(|r| r.sequence > lowest)
                        .collect();
                    (!rest.is_empty()).then_some((account, rest))
                })
                .collect();
            if todo.is_empty() {
                continue;
            }
            applied += todo.iter().map(|(_, r)| r.len() as u64).sum::<u64>();
            apply(store, projections, &todo, None).await?;
        }
    } else {
        for (account, after) in behind {
            let records = store.events_after(account, after).await?;
            applied += records.len() as u64;
            apply(store, projections, &[(account.to_owned(), records)], None).await?;
        }
    }
    Ok(applied)
}
