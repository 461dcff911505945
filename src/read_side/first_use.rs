//! The first verification of a rotated key's successor, noticed on the verify path.
//!
//! A rotation with `revoke_old_on_first_use` ends when the new key is first verified, on
//! any instance. The verify path cannot wait for a command to be decided, so it only
//! signals (once per key and process, without blocking) and [`crate::rotation`] revokes
//! the old key; the command id it uses is derived from the new key, so several
//! instances signalling at once still record one revocation. Only a successor whose
//! rotation is still open reaches [`FirstUseSignal::signal`] (the index forgets the
//! rotation once the old key's revocation is applied, milliseconds after the first use),
//! so the lock here is taken by a handful of verifications, not by a busy key's traffic.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::mpsc;
use uuid::Uuid;

/// A successor that was verified while its rotation still waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstUse {
    pub account_id: String,
    pub new_key_id: Uuid,
}

/// The verify path's side of the hand-over.
pub struct FirstUseSignal {
    /// Successors signalled and not forgotten since: each is handed over once.
    signalled: Mutex<HashSet<Uuid>>,
    tx: mpsc::UnboundedSender<FirstUse>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<FirstUse>>>,
}

impl Default for FirstUseSignal {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            signalled: Mutex::new(HashSet::new()),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl FirstUseSignal {
    /// Hands `new_key_id`'s first use over, unless it was already.
    pub fn signal(&self, account_id: &str, new_key_id: Uuid) {
        let fresh = self
            .signalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(new_key_id);
        if fresh {
            // Without the service's rotation task (a tool over the read side) the receiver
            // is never taken and the signal waits unread: the grace ends the old key.
            let _ = self.tx.send(FirstUse {
                account_id: account_id.to_owned(),
                new_key_id,
            });
        }
    }

    /// Lets the next verification of `new_key_id` signal again (the revocation failed, or
    /// the rotation is over and its entry may go).
    pub fn forget(&self, new_key_id: Uuid) {
        self.signalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&new_key_id);
    }

    /// The receiving end, once.
    pub fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<FirstUse>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}
