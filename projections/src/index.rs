//! The verification index: keyed-BLAKE3 hash → (account, key id, label, expiry, status).
//!
//! This is what every call to the sending API goes through, so it is laid out for speed and
//! memory: a hash map from the first 16 bytes of the hash to a slot in a flat `Vec` of
//! fixed-size entries (the other 16 bytes are compared there, so a lookup checks all 32),
//! labels in one shared string arena, account ids and login emails once per account. The
//! hashes are keyed with a secret pepper, so they are uniformly random to anyone without
//! it and the map uses them directly as their own hash (no SipHash on the hot path).
//!
//! A key past its expiry fails at once, whatever events have been recorded: expiry is
//! checked against the caller's `now` on every lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use chrono::{DateTime, Utc};
use keyledger_events::KeyringEvent;
use uuid::Uuid;

const ACTIVE: u8 = 0;
const REVOKED: u8 = 1;
const EXPIRED: u8 = 2;

/// The first half of a key hash; hashes itself by its first 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Prefix([u8; 16]);

impl Hash for Prefix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Passes a `write_u64` through: the keys are already uniformly random.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Clone)]
struct Entry {
    hash_tail: [u8; 16],
    key_id: Uuid,
    expires_at: i64,
    account: u32,
    label_start: u32,
    label_len: u16,
    status: u8,
}

struct Account {
    id: Box<str>,
    login_email: Box<str>,
    applied: u64,
    entries: Vec<u32>,
}

/// A legacy key: found by username, checked by the caller's bcrypt slow path.
#[derive(Debug, Clone)]
pub struct LegacyCandidate {
    pub entry: u32,
    /// `{username}_v1_{bcrypt hash without the salt}`.
    pub legacy_hash: String,
}

/// A valid key, borrowed from the index. Its facts are read on demand, so a caller that
/// needs only the verdict and the key id touches no more memory than that (each further
/// fact is another cache line on a cold index).
#[derive(Clone, Copy)]
pub struct Verified<'a> {
    index: &'a VerificationIndex,
    slot: u32,
}

impl<'a> Verified<'a> {
    fn entry(&self) -> &'a Entry {
        &self.index.entries[self.slot as usize]
    }

    fn account(&self) -> &'a Account {
        &self.index.accounts[self.entry().account as usize]
    }

    pub fn key_id(&self) -> Uuid {
        self.entry().key_id
    }

    pub fn expires_at(&self) -> DateTime<Utc> {
        from_micros(self.entry().expires_at)
    }

    pub fn account_id(&self) -> &'a str {
        &self.account().id
    }

    pub fn login_email(&self) -> &'a str {
        &self.account().login_email
    }

    pub fn label(&self) -> &'a str {
        let e = self.entry();
        let start = e.label_start as usize;
        self.index
            .labels
            .get(start..start + e.label_len as usize)
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Verified<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("account_id", &self.account_id())
            .field("key_id", &self.key_id())
            .field("label", &self.label())
            .field("expires_at", &self.expires_at())
            .finish()
    }
}

impl PartialEq for Verified<'_> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.index, other.index) && self.slot == other.slot
    }
}

impl Eq for Verified<'_> {}

/// The answer of a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    Valid(Verified<'a>),
    Unknown,
    Expired,
    Revoked,
}

/// Sizes, for measuring memory per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    pub keys: usize,
    pub accounts: usize,
    /// Heap bytes held by the index's own structures (excluding allocator overhead).
    pub heap_bytes: usize,
}

/// The in-memory verification index.
#[derive(Default)]
pub struct VerificationIndex {
    by_prefix: HashMap<Prefix, u32, BuildHasherDefault<PassThrough>>,
    entries: Vec<Entry>,
    labels: String,
    accounts: Vec<Account>,
    account_ix: HashMap<Box<str>, u32>,
    legacy: HashMap<Box<str>, Vec<LegacyCandidate>>,
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn split(hash: &[u8; 32]) -> (Prefix, [u8; 16]) {
    let mut head = [0u8; 16];
    let mut tail = [0u8; 16];
    head.copy_from_slice(&hash[..16]);
    tail.copy_from_slice(&hash[16..]);
    (Prefix(head), tail)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(m: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(m).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl VerificationIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves room for `keys` more keys (before a bulk load).
    pub fn reserve(&mut self, keys: usize) {
        self.by_prefix.reserve(keys);
        self.entries.reserve(keys);
    }

    /// The last sequence applied for `account_id` (0 when none).
    pub fn applied(&self, account_id: &str) -> u64 {
        self.account_ix
            .get(account_id)
            .map(|&a| self.accounts[a as usize].applied)
            .unwrap_or(0)
    }

    /// Applies `event`, the `sequence`-th of `account_id`. Returns false (and changes
    /// nothing) when that sequence was already applied.
    pub fn apply(&mut self, account_id: &str, sequence: u64, event: &KeyringEvent) -> bool {
        let account = self.account(account_id);
        let acc = &mut self.accounts[account as usize];
        if sequence <= acc.applied {
            return false;
        }
        acc.applied = sequence;
        match event {
            KeyringEvent::KeyGenerated(e) => {
                if acc.login_email.is_empty() {
                    acc.login_email = e.login_email.clone().into_boxed_str();
                }
                // A hash that is not 64 hex digits cannot be verified; it is still listed
                // so that revocation and expiry find the entry.
                let hash = decode_hash(&e.key_hash).unwrap_or([0u8; 32]);
                let slot = self.push_entry(account, e.key_id, &e.label, &hash, e.expires_at);
                let (prefix, _) = split(&hash);
                self.by_prefix.insert(prefix, slot);
            }
            KeyringEvent::LegacyKeyMigrated(e) => {
                if acc.login_email.is_empty() {
                    acc.login_email = e.login_email.clone().into_boxed_str();
                }
                let slot = self.push_entry(account, e.key_id, &e.label, &[0u8; 32], e.expires_at);
                let username = e.legacy_hash.split('_').next().unwrap_or_default();
                self.legacy
                    .entry(username.into())
                    .or_default()
                    .push(LegacyCandidate {
                        entry: slot,
                        legacy_hash: e.legacy_hash.clone(),
                    });
            }
            KeyringEvent::KeyRevoked(e) => self.update(account, e.key_id, |en| en.status = REVOKED),
            KeyringEvent::KeyExpired(e) => self.update(account, e.key_id, |en| {
                if en.status == ACTIVE {
                    en.status = EXPIRED;
                }
            }),
            KeyringEvent::KeyRotated(e) => {
                let cut = micros(e.old_key_expires_at);
                self.update(account, e.old_key_id, |en| {
                    en.expires_at = en.expires_at.min(cut)
                })
            }
            KeyringEvent::ContactsUpdated(_) | KeyringEvent::ExpiryReminderDue(_) => {}
        }
        true
    }

    /// Restores an account from a persisted snapshot (before its keys).
    pub fn restore_account(&mut self, account_id: &str, login_email: &str, applied: u64) {
        let a = self.account(account_id) as usize;
        self.accounts[a].login_email = login_email.into();
        self.accounts[a].applied = self.accounts[a].applied.max(applied);
    }

    /// Restores one key from a persisted snapshot. `status` is `active`, `revoked` or
    /// `expired`; a legacy key has no `key_hash` but a `legacy_hash`.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_key(
        &mut self,
        account_id: &str,
        key_id: Uuid,
        key_hash: Option<&str>,
        legacy_hash: Option<&str>,
        label: &str,
        expires_at: DateTime<Utc>,
        status: &str,
    ) {
        let account = self.account(account_id);
        let hash = key_hash.and_then(decode_hash).unwrap_or([0u8; 32]);
        let slot = self.push_entry(account, key_id, label, &hash, expires_at);
        self.entries[slot as usize].status = match status {
            "revoked" => REVOKED,
            "expired" => EXPIRED,
            _ => ACTIVE,
        };
        match legacy_hash {
            Some(legacy) => {
                let username = legacy.split('_').next().unwrap_or_default();
                self.legacy
                    .entry(username.into())
                    .or_default()
                    .push(LegacyCandidate {
                        entry: slot,
                        legacy_hash: legacy.to_owned(),
                    });
            }
            None => {
                let (prefix, _) = split(&hash);
                self.by_prefix.insert(prefix, slot);
            }
        }
    }

    fn account(&mut self, account_id: &str) -> u32 {
        if let Some(&a) = self.account_ix.get(account_id) {
            return a;
        }
        let a = self.accounts.len() as u32;
        self.accounts.push(Account {
            id: account_id.into(),
            login_email: "".into(),
            applied: 0,
            entries: Vec::new(),
        });
        self.account_ix.insert(account_id.into(), a);
        a
    }

    fn push_entry(
        &mut self,
        account: u32,
        key_id: Uuid,
        label: &str,
        hash: &[u8; 32],
        expires_at: DateTime<Utc>,
    ) -> u32 {
        let label_start = self.labels.len() as u32;
        // Labels are at most 255 characters (≤ 1020 bytes); clamp defensively.
        let label = truncate_to_boundary(label, u16::MAX as usize);
        self.labels.push_str(label);
        let (_, tail) = split(hash);
        let slot = self.entries.len() as u32;
        self.entries.push(Entry {
            hash_tail: tail,
            key_id,
            expires_at: micros(expires_at),
            account,
            label_start,
            label_len: label.len() as u16,
            status: ACTIVE,
        });
        self.accounts[account as usize].entries.push(slot);
        slot
    }

    fn update(&mut self, account: u32, key_id: Uuid, f: impl FnOnce(&mut Entry)) {
        let entries = &self.accounts[account as usize].entries;
        if let Some(&slot) = entries
            .iter()
            .find(|&&s| self.entries[s as usize].key_id == key_id)
        {
            f(&mut self.entries[slot as usize]);
        }
    }

    /// Looks up a key by its keyed-BLAKE3 hash, as of `now`.
    pub fn lookup(&self, hash: &[u8; 32], now: DateTime<Utc>) -> Lookup<'_> {
        let (prefix, tail) = split(hash);
        match self.by_prefix.get(&prefix) {
            Some(&slot) if self.entries[slot as usize].hash_tail == tail => {
                self.judge(slot, micros(now))
            }
            _ => Lookup::Unknown,
        }
    }

    fn judge(&self, slot: u32, now_micros: i64) -> Lookup<'_> {
        let e = &self.entries[slot as usize];
        match e.status {
            REVOKED => Lookup::Revoked,
            EXPIRED => Lookup::Expired,
            _ if e.expires_at <= now_micros => Lookup::Expired,
            _ => Lookup::Valid(Verified { index: self, slot }),
        }
    }

    /// Legacy keys whose username is `username`, for the bcrypt slow path.
    pub fn legacy_candidates(&self, username: &str) -> &[LegacyCandidate] {
        self.legacy.get(username).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Makes a legacy key findable by the keyed-BLAKE3 hash of its plaintext, once the slow
    /// path has matched it, so its next verifications take the fast path.
    pub fn link_legacy(&mut self, hash: &[u8; 32], candidate: &LegacyCandidate) {
        let (prefix, tail) = split(hash);
        if let Some(entry) = self.entries.get_mut(candidate.entry as usize) {
            entry.hash_tail = tail;
            self.by_prefix.insert(prefix, candidate.entry);
        }
    }

    /// Judges a legacy candidate that the slow path matched.
    pub fn judge_legacy(&self, candidate: &LegacyCandidate, now: DateTime<Utc>) -> Lookup<'_> {
        self.judge(candidate.entry, micros(now))
    }

    /// The login email recorded for `account_id`.
    pub fn login_email(&self, account_id: &str) -> Option<&str> {
        self.account_ix
            .get(account_id)
            .map(|&a| &*self.accounts[a as usize].login_email)
            .filter(|e| !e.is_empty())
    }

    /// Sizes of the index, to measure memory per key.
    pub fn stats(&self) -> IndexStats {
        let map = self.by_prefix.capacity() * (std::mem::size_of::<(Prefix, u32)>() + 1);
        let entries = self.entries.capacity() * std::mem::size_of::<Entry>();
        let accounts: usize = self
            .accounts
            .iter()
            .map(|a| {
                std::mem::size_of::<Account>()
                    + a.id.len() * 2
                    + a.login_email.len()
                    + a.entries.capacity() * 4
                    + std::mem::size_of::<(Box<str>, u32)>()
                    + 1
            })
            .sum();
        IndexStats {
            keys: self.entries.len(),
            accounts: self.accounts.len(),
            heap_bytes: map + entries + self.labels.capacity() + accounts,
        }
    }

    /// Releases spare capacity after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
        self.labels.shrink_to_fit();
    }
}

fn truncate_to_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyledger_events::{KeyExpired, KeyGenerated, KeyRevoked};

    fn hex(bytes: &[u8; 32]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn generated(key_id: Uuid, hash: &[u8; 32], expires_at: DateTime<Utc>) -> KeyringEvent {
        KeyringEvent::KeyGenerated(KeyGenerated {
            command_id: Uuid::new_v4(),
            key_id,
            label: "prod".into(),
            last_five: "abcde".into(),
            key_hash: hex(hash),
            hash_scheme: keyledger_events::HASH_SCHEME_BLAKE3.into(),
            contacts: vec![],
            login_email: "john.doe@agency.gov.sg".into(),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            expires_at,
            rotated_from: None,
        })
    }

    #[test]
    fn lookup_answers_valid_unknown_expired_revoked() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(10);
        let later = now + chrono::Duration::days(100);
        let (k1, k2) = (Uuid::new_v4(), Uuid::new_v4());
        let (h1, h2) = ([1u8; 32], [2u8; 32]);
        let mut ix = VerificationIndex::new();
        ix.apply("acc", 1, &generated(k1, &h1, later));
        ix.apply("acc", 2, &generated(k2, &h2, later));
        match ix.lookup(&h1, now) {
            Lookup::Valid(v) => {
                assert_eq!(v.account_id(), "acc");
                assert_eq!(v.key_id(), k1);
                assert_eq!(v.label(), "prod");
                assert_eq!(v.login_email(), "john.doe@agency.gov.sg");
                assert_eq!(v.expires_at(), later);
            }
            other => panic!("expected valid, got {other:?}"),
        }
        assert_eq!(ix.lookup(&[3u8; 32], now), Lookup::Unknown);
        let mut near = h1;
        near[31] ^= 1;
        assert_eq!(
            ix.lookup(&near, now),
            Lookup::Unknown,
            "all 32 bytes compared"
        );
        assert_eq!(
            ix.lookup(&h1, later),
            Lookup::Expired,
            "expiry checked at lookup"
        );
        ix.apply(
            "acc",
            3,
            &KeyringEvent::KeyRevoked(KeyRevoked {
                command_id: Uuid::new_v4(),
                key_id: k1,
                revoked_at: now,
            }),
        );
        assert_eq!(ix.lookup(&h1, now), Lookup::Revoked);
        ix.apply(
            "acc",
            4,
            &KeyringEvent::KeyExpired(KeyExpired {
                command_id: Uuid::new_v4(),
                key_id: k2,
                expires_at: later,
                expired_at: later,
                recipients: vec![],
                label: String::new(),
                last_five: String::new(),
                login_email: String::new(),
            }),
        );
        assert_eq!(ix.lookup(&h2, now), Lookup::Expired);
        assert!(!ix.apply("acc", 4, &generated(Uuid::new_v4(), &[9u8; 32], later)));
        assert_eq!(ix.applied("acc"), 4);
    }
}
