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
    #[error(
        "reply_public_key is a small-order point: a box sealed to it would be readable by anyone"
    )]
    SmallOrder,
    #[error("sealing failed")]
    Seal,
}

/// Parses a base64 X25519 public key, refusing the small-order points (all zeros and the
/// like), to which a sealed box would be encrypted under a shared secret anyone can compute.
pub fn parse_public_key(b64: Option<&str>) -> Result<PublicKey, SealError> {
    let b64 = b64.ok_or(SealError::Missing)?;
    let bytes = keyledger_events::signature::base64_array::<32>(b64).ok_or(SealError::Invalid)?;
    let point = curve25519_dalek::montgomery::MontgomeryPoint(bytes);
    // A point on the curve whose order divides the cofactor; twist points are not, and
    // libsodium accepts them too.
    if point.to_edwards(0).is_some_and(|p| p.is_small_order()) {
        return Err(SealError::SmallOrder);
    }
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
        // All zeros, one, and an order-8 point: refused.
        let mut one = [0u8; 32];
        one[0] = 1;
        let order8: [u8; 32] = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        for bad in [[0u8; 32], one, order8] {
            assert_eq!(
                parse_public_key(Some(&STANDARD.encode(bad))).err(),
                Some(SealError::SmallOrder)
            );
        }
    }
}
