//! API keys: minting, hashing, parsing what a caller presents.
//!
//! Format `{username}_v1_{secret}`: the secret is 33 CSPRNG bytes in standard base64 (44
//! characters, no padding, never a `_`), so a key splits into exactly three parts. Only the
//! keyed-BLAKE3 hash of the whole key and its last five characters are ever kept. The
//! plaintext lives in a [`PlaintextKey`], which zeroes its memory on drop and prints as
//! `[redacted]` in any `Debug` or log output.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

/// The key-format / hashing-scheme version in every key keyledger issues.
pub const KEY_VERSION: &str = "v1";
const SECRET_BYTES: usize = 33;
const SECRET_CHARS: usize = 44;
const MAX_USERNAME: usize = 64;

/// A string that must never be printed: a pepper, a token.
#[derive(Clone)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A freshly minted key in the clear; shown once to its caller, never stored.
pub struct PlaintextKey(Zeroizing<String>);

impl PlaintextKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlaintextKey([redacted])")
    }
}

/// Keyed BLAKE3 with a server-side pepper: nanoseconds per key, useless to anyone who
/// steals the database without the pepper.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher([redacted])")
    }
}

impl KeyHasher {
    /// Derives the 32-byte BLAKE3 key from the configured pepper (any length).
    pub fn new(pepper: &[u8]) -> Self {
        Self {
            key: blake3::derive_key("keyledger 2026-11 api key hashing pepper v1", pepper),
        }
    }

    pub fn hash(&self, key: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.key, key.as_bytes()).as_bytes()
    }

    pub fn hash_hex(&self, key: &str) -> String {
        to_hex(&self.hash(key))
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A new key with what may be kept of it.
#[derive(Debug)]
pub struct MintedKey {
    pub plaintext: PlaintextKey,
    pub key_hash: String,
    pub last_five: String,
}

/// Mints a key for `username` (already reduced to ASCII letters and digits).
pub fn mint_key(username: &str, hasher: &KeyHasher) -> MintedKey {
    let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
    OsRng.fill_bytes(secret.as_mut());
    let mut key = Zeroizing::new(String::with_capacity(username.len() + 4 + SECRET_CHARS));
    key.push_str(username);
    key.push('_');
    key.push_str(KEY_VERSION);
    key.push('_');
    STANDARD.encode_string(secret.as_ref(), &mut key);
    let last_five = key[key.len() - 5..].to_owned();
    let key_hash = hasher.hash_hex(&key);
    MintedKey {
        plaintext: PlaintextKey(key),
        key_hash,
        last_five,
    }
}

/// Why a presented key is not even shaped like a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    #[error("a key has three parts separated by '_'")]
    Parts,
    #[error("the key's username part must be 1-64 ASCII letters or digits")]
    Username,
    #[error("unsupported key version")]
    Version,
    #[error("the key's secret must be 44 characters of standard base64")]
    Secret,
}

/// A key as presented by a caller, checked for shape only (never printed).
pub struct PresentedKey<'a> {
    raw: &'a str,
    username: &'a str,
    secret: &'a str,
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresentedKey([redacted])")
    }
}

impl<'a> PresentedKey<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, MalformedKey> {
        let mut parts = raw.splitn(3, '_');
        let (Some(username), Some(version), Some(secret)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedKey::Parts);
        };
        if username.is_empty()
            || username.len() > MAX_USERNAME
            || !username.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(MalformedKey::Username);
        }
        if version != KEY_VERSION {
            return Err(MalformedKey::Version);
        }
        if secret.len() != SECRET_CHARS
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        {
            return Err(MalformedKey::Secret);
        }
        Ok(Self {
            raw,
            username,
            secret,
        })
    }

    pub fn as_str(&self) -> &'a str {
        self.raw
    }

    pub fn username(&self) -> &'a str {
        self.username
    }

    /// The secret part (what Postman's legacy scheme hashes with bcrypt).
    pub fn secret(&self) -> &'a str {
        self.secret
    }
}

/// Why a legacy hash is not Postman's `{username}_v1_{31 chars of bcrypt}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyHashError {
    #[error("legacy hash must look like '{{username}}_v1_{{bcrypt hash without its salt}}'")]
    Shape,
    #[error("legacy hash username '{found}' does not match the login email's '{expected}'")]
    Username { found: String, expected: String },
}

/// Checks a legacy hash's shape and returns its username part.
pub fn legacy_hash_username(legacy_hash: &str) -> Result<&str, LegacyHashError> {
    let mut parts = legacy_hash.splitn(3, '_');
    let (Some(username), Some(version), Some(hash)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(LegacyHashError::Shape);
    };
    let bcrypt_chars = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'/';
    if username.is_empty()
        || !username.bytes().all(|b| b.is_ascii_alphanumeric())
        || version != KEY_VERSION
        || hash.len() != 31
        || !hash.bytes().all(bcrypt_chars)
    {
        return Err(LegacyHashError::Shape);
    }
    Ok(username)
}

/// Where `bytes` hold something shaped like a key: 1–64 ASCII letters or digits, `_v1_`,
/// then exactly 44 characters of standard base64. A byte scan (`memchr` for `_v1_`), cheap
/// enough for every event and for scanning files; yields each match's byte range.
pub fn key_shaped(bytes: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/';
    // A username may run back into the previous match's secret: matches never overlap.
    let mut previous_end = 0;
    memchr::memmem::find_iter(bytes, b"_v1_").filter_map(move |at| {
        if at < previous_end {
            return None;
        }
        let user = bytes[..at]
            .iter()
            .rev()
            .take(65)
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        let secret = &bytes[at + 4..];
        let long_enough =
            secret.len() >= SECRET_CHARS && secret[..SECRET_CHARS].iter().all(|c| b64(*c));
        let ends_there = secret.get(SECRET_CHARS).is_none_or(|c| !b64(*c));
        let found = ((1..=64).contains(&user) && long_enough && ends_there)
            .then(|| at - user.min(at - previous_end)..at + 4 + SECRET_CHARS);
        if let Some(r) = &found {
            previous_end = r.end;
        }
        found
    })
}

/// Whether `bytes` hold anything [`key_shaped`].
pub fn contains_key_shaped(bytes: &[u8]) -> bool {
    key_shaped(bytes).next().is_some()
}

/// `text` with every [`key_shaped`] string replaced by `[key …xxxxx]` (its last five):
/// for free text that is kept or shown (a leak report's source, a dead letter) and must not
/// carry a key at rest.
pub fn redact_keys(text: &str) -> std::borrow::Cow<'_, str> {
    if memchr::memmem::find(text.as_bytes(), b"_v1_").is_none() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for span in key_shaped(text.as_bytes()) {
        // Spans are ASCII and never overlap, so these are character boundaries in order.
        out.push_str(text.get(at..span.start).unwrap_or_default());
        out.push_str("[key …");
        out.push_str(text.get(span.end - 5..span.end).unwrap_or_default());
        out.push(']');
        at = span.end;
    }
    out.push_str(text.get(at..).unwrap_or_default());
    // What is left after a `_v1_` is not a whole key — cut off, percent-encoded, JSON-
    // escaped — but may be most of one: its characters go too.
    let mut clean = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("_v1_") {
        clean.push_str(&rest[..i + 4]);
        let tail = &rest[i + 4..];
        let secretish = tail
            .char_indices()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || "+/%\\=".contains(*c))
            .last()
            .map(|(j, c)| j + c.len_utf8())
            .unwrap_or(0);
        if secretish > 0 {
            clean.push('…');
        }
        rest = &tail[secretish..];
    }
    clean.push_str(rest);
    std::borrow::Cow::Owned(clean)
}

#[cfg(test)]
mod tests {
    #[test]
    fn redaction_keeps_only_the_last_five() {
        let key = mint_key("johndoe", &KeyHasher::new(b"pepper"));
        let k = key.plaintext.expose();
        let text = format!("found at https://x.test/?k={k} and {k}.");
        let red = redact_keys(&text);
        assert!(!red.contains(k));
        assert_eq!(
            red.matches(&format!("[key …{}]", &k[k.len() - 5..]))
                .count(),
            2
        );
        assert_eq!(redact_keys("nothing here"), "nothing here");
        // Overlapping shapes (a username running into the previous secret): no panic.
        let overlapping = format!("a_v1_{}_v1_{}", "A".repeat(44), "B".repeat(44));
        let red = redact_keys(&overlapping);
        assert!(
            !red.contains(&"A".repeat(10)) && !red.contains(&"B".repeat(10)),
            "{red}"
        );
        // Cut off, percent-encoded or JSON-escaped: still no secret left.
        let encoded = k.replace('/', "%2F").replace('+', "%2B");
        let escaped = k.replace('/', "\\/");
        let cut = &k[..k.len() - 3];
        for text in [encoded.as_str(), escaped.as_str(), cut] {
            let red = redact_keys(text);
            assert!(
                !red.contains(&k[k.len() - 20..k.len() - 10]),
                "{text} -> {red}"
            );
        }
    }

    #[test]
    fn key_shaped_strings_are_found_in_text() {
        let key = mint_key("johndoe", &KeyHasher::new(b"pepper"));
        let text = format!("label: prod {} (copied)", key.plaintext.expose());
        let spans: Vec<_> = key_shaped(text.as_bytes()).collect();
        assert_eq!(spans.len(), 1);
        assert_eq!(&text[spans[0].clone()], key.plaintext.expose());
        assert!(!contains_key_shaped(b"johndoe_v1_tooshort"));
        assert!(!contains_key_shaped(
            format!("_v1_{}", "A".repeat(44)).as_bytes()
        ));
        assert!(!contains_key_shaped(
            format!("jo_v1_{}", "A".repeat(45)).as_bytes()
        ));
    }

    use super::*;

    #[test]
    fn minted_keys_have_the_documented_shape() {
        let hasher = KeyHasher::new(b"pepper");
        let m = mint_key("johndoe", &hasher);
        let key = m.plaintext.expose();
        assert!(key.starts_with("johndoe_v1_"));
        assert_eq!(key.len(), "johndoe_v1_".len() + 44);
        assert_eq!(key.split('_').count(), 3);
        assert_eq!(m.last_five, &key[key.len() - 5..]);
        assert_eq!(m.key_hash, hasher.hash_hex(key));
        assert_eq!(m.key_hash.len(), 64);
        let parsed = PresentedKey::parse(key).expect("own keys parse");
        assert_eq!(parsed.username(), "johndoe");
        assert_eq!(STANDARD.decode(parsed.secret()).map(|v| v.len()), Ok(33));
        assert_eq!(format!("{:?}", m.plaintext), "PlaintextKey([redacted])");
    }

    #[test]
    fn the_pepper_changes_the_hash() {
        assert_ne!(
            KeyHasher::new(b"a").hash("k"),
            KeyHasher::new(b"b").hash("k")
        );
    }

    #[test]
    fn malformed_keys_are_told_apart() {
        let secret = "A".repeat(44);
        assert_eq!(
            PresentedKey::parse("nounderscores").err(),
            Some(MalformedKey::Parts)
        );
        assert_eq!(
            PresentedKey::parse(&format!("_v1_{secret}")).err(),
            Some(MalformedKey::Username)
        );
        assert_eq!(
            PresentedKey::parse(&format!("jo_v2_{secret}")).err(),
            Some(MalformedKey::Version)
        );
        assert_eq!(
            PresentedKey::parse("jo_v1_short").err(),
            Some(MalformedKey::Secret)
        );
        assert_eq!(
            PresentedKey::parse(&format!("jo_v1_{}", "_".repeat(44))).err(),
            Some(MalformedKey::Secret)
        );
        assert!(PresentedKey::parse(&format!("jo_v1_{secret}")).is_ok());
    }

    #[test]
    fn legacy_hash_shape() {
        let h = format!("johndoe_v1_{}", "a".repeat(31));
        assert_eq!(legacy_hash_username(&h), Ok("johndoe"));
        assert!(legacy_hash_username("johndoe_v1_short").is_err());
        assert!(legacy_hash_username(&format!("john.doe_v1_{}", "a".repeat(31))).is_err());
    }
}
