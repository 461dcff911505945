//! Sealed boxes: how a new key travels to the service that asked for it over the bus.
//!
//! libsodium's `crypto_box_seal` (X25519 + XSalsa20-Poly1305, anonymous sender), via the
//! `crypto_box` crate: only the holder of the private key matching the command's
//! `reply_public_key` can open it; the plaintext never sits in Kafka.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use crypto_box::PublicKey;
use rand::rngs::OsRng;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("reply_public_key is required for GenerateKey and RotateKey over the bus")]
    Missing,
    #[error("reply_public_key must be 32 bytes of standard base64 (an X25519 public key)")]
    Invalid,
    #[error("sealing failed")]
    Seal,
}

/// Parses a base64 X25519 public key.
pub fn parse_public_key(b64: Option<&str>) -> Result<PublicKey, SealError> {
    let b64 = b64.ok_or(SealError::Missing)?;
    let bytes = STANDARD
        .decode(b64.trim())
        .map_err(|_| SealError::Invalid)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| SealError::Invalid)?;
    Ok(PublicKey::from(bytes))
}

/// Seals `secret` to `to`; returns base64.
pub fn seal(to: &PublicKey, secret: &[u8]) -> Result<String, SealError> {
    to.seal(&mut OsRng, secret)
        .map(|ct| STANDARD.encode(ct))
        .map_err(|_| SealError::Seal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crypto_box::SecretKey;

    #[test]
    fn sealed_boxes_open_with_the_private_key_only() {
        let sk = SecretKey::generate(&mut OsRng);
        let pk_b64 = STANDARD.encode(sk.public_key().as_bytes());
        let pk = parse_public_key(Some(&pk_b64)).expect("valid key");
        let sealed = seal(&pk, b"johndoe_v1_secret").expect("seals");
        let ct = STANDARD.decode(sealed).expect("base64");
        assert_eq!(sk.unseal(&ct).expect("opens"), b"johndoe_v1_secret");
        let other = SecretKey::generate(&mut OsRng);
        assert!(other.unseal(&ct).is_err());
        assert_eq!(parse_public_key(None).err(), Some(SealError::Missing));
        assert_eq!(
            parse_public_key(Some("AAAA")).err(),
            Some(SealError::Invalid)
        );
    }
}
