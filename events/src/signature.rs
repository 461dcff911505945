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
        let bytes = base64_array::<32>(s).ok_or(LogKeyError::Encoding)?;
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

/// The keys a log may be signed with: the current signing key's, then those of keys it was
/// signed with before (a rotated signing key leaves the earlier events signed by the old
/// one: they stay vouched for as long as its public key is listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogKeys {
    current: LogKey,
    previous: Vec<LogKey>,
}

impl LogKeys {
    pub fn new(current: LogKey, previous: Vec<LogKey>) -> Self {
        Self { current, previous }
    }

    /// From base64 public keys, the current one first.
    pub fn from_base64<S: AsRef<str>>(keys: &[S]) -> Result<Option<Self>, LogKeyError> {
        let mut parsed = keys
            .iter()
            .map(|k| LogKey::from_base64(k.as_ref()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        Ok(parsed
            .next()
            .map(|current| Self::new(current, parsed.collect())))
    }

    pub fn current(&self) -> LogKey {
        self.current
    }

    pub fn previous(&self) -> &[LogKey] {
        &self.previous
    }

    /// Whether `signature` signs `chain` under any of the keys.
    pub fn verifies(&self, chain: &[u8; 32], signature: &str) -> bool {
        self.current.verifies(chain, signature)
            || self.previous.iter().any(|k| k.verifies(chain, signature))
    }

    /// Whether every pair verifies under some key: as one batch under the current key, else
    /// one by one.
    pub fn all_verify(&self, items: &[([u8; 32], &str)]) -> bool {
        self.current.all_verify(items)
            || (!self.previous.is_empty() && items.iter().all(|(c, s)| self.verifies(c, s)))
    }
}

impl From<LogKey> for LogKeys {
    fn from(current: LogKey) -> Self {
        Self::new(current, Vec::new())
    }
}

/// Exactly `N` bytes from standard base64 (surrounding white space ignored): the shape of
/// every key, seed and signature keyledger reads.
pub fn base64_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    STANDARD.decode(s.trim()).ok()?.try_into().ok()
}

fn decode(signature: &str) -> Option<Signature> {
    base64_array::<64>(signature).map(|bytes| Signature::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    fn key(seed: u8) -> (SigningKey, LogKey) {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        let pk = LogKey::from_bytes(sk.verifying_key().as_bytes()).expect("key");
        (sk, pk)
    }

    fn sign(sk: &SigningKey, chain: &[u8; 32]) -> String {
        STANDARD.encode(sk.sign(chain).to_bytes())
    }

    #[test]
    fn a_rotated_key_still_vouches_for_what_it_signed() {
        let ((old_sk, old), (new_sk, new), (_, stranger)) = (key(1), key(2), key(3));
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (by_old, by_new) = (sign(&old_sk, &a), sign(&new_sk, &b));
        let keys = LogKeys::new(new, vec![old]);
        assert!(keys.verifies(&a, &by_old) && keys.verifies(&b, &by_new));
        assert!(keys.all_verify(&[(a, &by_old), (b, &by_new)]));
        assert!(!keys.verifies(&b, &by_old), "a signature of another value");
        let alone = LogKeys::from(new);
        assert!(!alone.verifies(&a, &by_old));
        assert!(!alone.all_verify(&[(a, &by_old), (b, &by_new)]));
        assert!(!LogKeys::new(stranger, vec![]).verifies(&b, &by_new));
        let parsed = LogKeys::from_base64(&[new.to_base64(), old.to_base64()])
            .expect("parses")
            .expect("some");
        assert_eq!(parsed, keys);
        assert!(LogKeys::from_base64::<String>(&[])
            .expect("empty")
            .is_none());
    }
}
