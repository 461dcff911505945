//! The log signs itself: each event's chain value (32 bytes, see [`crate::chain`]) is signed
//! with Ed25519 by the service's signing key; the signature travels with the event (base64,
//! in the envelope's `signature`). Anyone holding the public key (`GET /v1/log-key`) can
//! check that a record was written by keyledger: a forged event has no valid signature, and
//! since a chain value covers every earlier event of the account, a valid signature on an
//! account's last event vouches for its whole history as recomputed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};

/// The algorithm, as `GET /v1/log-key` names it.
pub const ALGORITHM: &str = "ed25519";

/// The public half of the log's signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogKey(VerifyingKey);

#[derive(Debug, thiserror::Error)]
pub enum LogKeyError {
    #[error("a log key is the standard base64 of 32 bytes")]
    Encoding,
    #[error("not an Ed25519 public key")]
    Key,
}

impl LogKey {
    /// From the base64 `GET /v1/log-key` serves.
    pub fn from_base64(s: &str) -> Result<Self, LogKeyError> {
        let bytes: [u8; 32] = STANDARD
            .decode(s.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(LogKeyError::Encoding)?;
        Self::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, LogKeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| LogKeyError::Key)?;
        if key.is_weak() {
            return Err(LogKeyError::Key);
        }
        Ok(Self(key))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// Whether `signature` (base64) signs `chain` under this key.
    pub fn verifies(&self, chain: &[u8; 32], signature: &str) -> bool {
        decode(signature).is_some_and(|sig| self.0.verify_strict(chain, &sig).is_ok())
    }

    /// Whether every (chain value, signature) pair verifies, checked as one batch (about
    /// twice as fast as one by one); false when any is wrong (then check them one by one
    /// to name it).
    pub fn all_verify(&self, items: &[([u8; 32], &str)]) -> bool {
        let mut signatures = Vec::with_capacity(items.len());
        for (_, s) in items {
            match decode(s) {
                Some(sig) => signatures.push(sig),
                None => return false,
            }
        }
        let messages: Vec<&[u8]> = items.iter().map(|(c, _)| c.as_slice()).collect();
        let keys = vec![self.0; items.len()];
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    }
}

fn decode(signature: &str) -> Option<Signature> {
    let bytes: [u8; 64] = STANDARD.decode(signature).ok()?.try_into().ok()?;
    Some(Signature::from_bytes(&bytes))
}
