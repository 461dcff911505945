//! The service's signing key: it signs each event's chain value (see
//! `keyledger_events::signature`), so the log authenticates itself to every consumer and
//! auditor that holds the public key. The seed is a secret like the pepper: configured
//! (`KEYLEDGER_SIGNING_KEY`, base64 of 32 bytes) or, embedded, generated once (mode 0600).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use keyledger_events::signature::{base64_array, LogKey};
use rand::RngCore;

/// Signs chain values. `Debug` shows the public key only.
#[derive(Clone)]
pub struct LogSigner {
    key: SigningKey,
}

impl std::fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSigner")
            .field("public_key", &self.public_key().to_base64())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a signing key is the standard base64 of a 32-byte seed")]
pub struct SigningKeyError;

impl LogSigner {
    /// From the base64 of a 32-byte seed.
    pub fn from_base64(seed: &str) -> Result<Self, SigningKeyError> {
        let bytes = base64_array::<32>(seed).ok_or(SigningKeyError)?;
        Ok(Self {
            key: SigningKey::from_bytes(&bytes),
        })
    }

    /// A fresh seed from the OS CSPRNG, as base64.
    pub fn generate_seed() -> String {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        STANDARD.encode(seed)
    }

    /// The signature of `chain`, as base64.
    pub fn sign(&self, chain: &[u8; 32]) -> String {
        STANDARD.encode(self.key.sign(chain).to_bytes())
    }

    pub fn public_key(&self) -> LogKey {
        // A key derived from a seed is never weak.
        LogKey::from_bytes(self.key.verifying_key().as_bytes())
            .unwrap_or_else(|_| unreachable!("an Ed25519 key from a seed is valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_chain_value_and_key() {
        let signer = LogSigner::from_base64(&LogSigner::generate_seed()).expect("seed");
        let chain = [7u8; 32];
        let sig = signer.sign(&chain);
        let key = signer.public_key();
        assert!(key.verifies(&chain, &sig));
        assert!(!key.verifies(&[8u8; 32], &sig));
        let other = LogSigner::from_base64(&LogSigner::generate_seed()).expect("seed");
        assert!(!other.public_key().verifies(&chain, &sig));
        assert!(!key.verifies(&chain, "not base64"));
        let back = LogKey::from_base64(&key.to_base64()).expect("round trip");
        assert!(back.verifies(&chain, &sig));
        assert!(key.all_verify(&[(chain, sig.as_str()), (chain, sig.as_str())]));
        assert!(!key.all_verify(&[(chain, sig.as_str()), ([8u8; 32], sig.as_str())]));
        assert!(format!("{signer:?}").contains(&key.to_base64()));
        assert!(LogSigner::from_base64("c2hvcnQ=").is_err());
    }
}
