//! Rotations that end on first use: when the successor of a rotation made with
//! `revoke_old_on_first_use` is first verified on this instance, revoke the old key
//! (`KeyRevoked`, `cause = rotated`).
//!
//! The command is keyledger's own (`RetireRotatedKey`, refused from callers) and its id is
//! derived from the new key, so instances that see the first use at the same moment issue
//! the same command: the store's optimistic concurrency lets one commit and the others
//! find it already handled (or nothing left to retire). A failure lets the next
//! verification try again; the old key's grace ends it in any case.

use std::sync::Arc;

use keyledger_events::Command;
use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::AccountId;
use crate::handler::{CommandHandler, HandleError, Request, Status};
use crate::keyring::KeyringError;
use crate::read_side::first_use::FirstUse;
use crate::read_side::ReadSide;

/// The actor recorded on these revocations.
pub const ACTOR: &str = "first-use";

/// The command id of the revocation `new_key_id`'s first use causes: the same on every
/// instance.
pub fn command_id(new_key_id: Uuid) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x6b65_796c_6564_6765_722d_6669_7273_7475);
    Uuid::new_v5(&NAMESPACE, new_key_id.as_bytes())
}

/// Revokes the old key of each first use the verify path signals, until stopped.
pub async fn run(
    read_side: Arc<ReadSide>,
    handler: Arc<CommandHandler>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut uses) = read_side.first_use().take_receiver() else {
        return;
    };
    loop {
        let used = tokio::select! {
            u = uses.recv() => u,
            _ = stop.changed() => return,
        };
        let Some(used) = used else { return };
        // Forgotten later either way: after a failure, so that a busy successor does not
        // retry on every verification; after success, once the revocation has long reached
        // the index (a repeat would only be answered as a duplicate).
        let wait = if retire(&handler, &used).await {
            FORGET_AFTER_SUCCESS
        } else {
            RETRY_AFTER
        };
        let read_side = read_side.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            read_side.first_use().forget(used.new_key_id);
        });
    }
}

/// How soon a failed revocation may be tried again (on the successor's next verification).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a successful one is remembered, so the same process does not issue it again.
const FORGET_AFTER_SUCCESS: std::time::Duration = std::time::Duration::from_secs(60);

/// Issues the revocation; false when it should be tried again.
async fn retire(handler: &CommandHandler, used: &FirstUse) -> bool {
    let Ok(account_id) = AccountId::parse(&used.account_id) else {
        return true;
    };
    let request = Request {
        account_id,
        command_id: command_id(used.new_key_id),
        actor: ACTOR.into(),
        command: Command::RetireRotatedKey {
            new_key_id: used.new_key_id,
        },
        reply_key: None,
    };
    match handler.execute(request).await {
        Ok(outcome) => {
            if outcome.status == Status::Accepted {
                tracing::info!(account_id = used.account_id, new_key_id = %used.new_key_id, "successor verified: old key revoked");
                crate::metrics::metrics().count(
                    "keyledger_rotations_ended_on_first_use_total",
                    &[],
                    1,
                );
            }
            true
        }
        // Another instance (or the grace) ended it first.
        Err(HandleError::Rejected(
            KeyringError::NothingToRetire(_) | KeyringError::KeyNotFound(_),
        )) => true,
        // Someone used this command id for another command (it is derivable): retrying
        // cannot help; the grace ends the old key.
        Err(HandleError::IdempotencyKeyReused) => {
            tracing::error!(account_id = used.account_id, new_key_id = %used.new_key_id, "the first-use revocation's command id was taken by another command; the old key ends with its grace");
            true
        }
        Err(e) => {
            tracing::warn!(account_id = used.account_id, new_key_id = %used.new_key_id, error = %e, "cannot end a rotation on first use; the next verification retries");
            false
        }
    }
}
