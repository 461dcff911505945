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
use std::sync::atomic::{AtomicU32, Ordering};

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

struct Entry {
    hash_tail: [u8; 16],
    key_id: Uuid,
    expires_at: i64,
    account: u32,
    label_start: u32,
    label_len: u16,
    status: u8,
    /// Successful verifications since the usage was last drained (in memory only). In the
    /// padding the other fields leave (51 bytes → 56 either way): counting costs no memory.
    uses: AtomicU32,
}

// The usage counter lives in padding: an entry is still 56 bytes.
const _: () = assert!(std::mem::size_of::<Entry>() == 56);

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

    /// The old key this key's first use revokes (a rotation with `revoke_old_on_first_use`
    /// whose old key is still live).
    pub fn retires(&self) -> Option<Uuid> {
        if self.index.first_use.is_empty() {
            return None;
        }
        self.index.first_use.get(&self.key_id()).copied()
    }

    /// Counts a successful verification for the usage table: one relaxed atomic add on
    /// the entry the lookup has just read, under the read lock every verify already holds.
    /// (When is the drain's business: a key counted since the last drain was used since.)
    #[inline]
    pub fn note_use(&self) {
        self.entry().uses.fetch_add(1, Ordering::Relaxed);
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

/// A key's verifications counted in memory, drained for the usage table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub account_id: String,
    pub key_id: Uuid,
    pub verifications: u32,
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
    /// Rotations that end on the successor's first use: new key id → old key id, until the
    /// revocation or expiry of either key is recorded. Small (rotations in flight), so every
    /// verify pays one emptiness check and only a successor's verify a lookup.
    first_use: HashMap<Uuid, Uuid>,
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
            KeyringEvent::KeyRevoked(e) => {
                self.end_first_use(e.key_id);
                self.update(account, e.key_id, |en| en.status = REVOKED)
            }
            KeyringEvent::KeyExpired(e) => {
                self.end_first_use(e.key_id);
                self.update(account, e.key_id, |en| {
                    if en.status == ACTIVE {
                        en.status = EXPIRED;
                    }
                })
            }
            KeyringEvent::KeyRotated(e) => {
                if e.revoke_old_on_first_use {
                    self.first_use.insert(e.new_key_id, e.old_key_id);
                }
                let cut = micros(e.old_key_expires_at);
                self.update(account, e.old_key_id, |en| {
                    en.expires_at = en.expires_at.min(cut)
                })
            }
            KeyringEvent::ContactsUpdated(_) | KeyringEvent::ExpiryReminderDue(_) => {}
        }
        true
    }

    /// Forgets the first-use rotations `key_id` takes part in (it was revoked or expired).
    fn end_first_use(&mut self, key_id: Uuid) {
        if !self.first_use.is_empty() {
            self.first_use
                .retain(|new, old| *new != key_id && *old != key_id);
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
            uses: AtomicU32::new(0),
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

    /// The key with this hash whatever its state (a leak report must tell a revoked key
    /// from one keyledger never issued; whether it is live, its keyring decides).
    pub fn find(&self, hash: &[u8; 32]) -> Option<Verified<'_>> {
        let (prefix, tail) = split(hash);
        let &slot = self.by_prefix.get(&prefix)?;
        (self.entries[slot as usize].hash_tail == tail).then_some(Verified { index: self, slot })
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

    /// Takes the verifications counted since the last call, up to `max` keys from entry
    /// `from` on: (uses, the next entry to look at, or None at the end). Counters are
    /// swapped to zero one by one, so a verification running meanwhile is counted here or
    /// in the next call, never lost or twice.
    pub fn drain_usage(&self, from: usize, max: usize) -> (Vec<Usage>, Option<usize>) {
        let mut out = Vec::new();
        let end = from.saturating_add(max).min(self.entries.len());
        for e in self.entries.get(from..end).unwrap_or_default() {
            if e.uses.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let uses = e.uses.swap(0, Ordering::Relaxed);
            out.push(Usage {
                account_id: self.accounts[e.account as usize].id.to_string(),
                key_id: e.key_id,
                verifications: uses,
            });
        }
        (out, (end < self.entries.len()).then_some(end))
    }

    /// Releases spare capacity after a bulk load.
    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
        self.labels.shrink_to_fit();
    }
}

/// Why a snapshot could not be read (it is then ignored and the log replayed).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not an index snapshot of this version")]
    Format,
    #[error("the snapshot is truncated or damaged")]
    Damaged,
}

/// Version 2 added the first-use rotations. A version-1 snapshot is still read: it was
/// written before any rotation could ask to end on first use, so it holds none.
const SNAPSHOT_MAGIC: &[u8; 8] = b"KLIDX\0\0\x02";
const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"KLIDX\0\0\x01";

/// A little-endian writer for snapshots.
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }
}

/// A reader of what [`Out`] wrote; every read is bounds-checked.
struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Damaged);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn len(&mut self) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        // No count can exceed the bytes left: a damaged count cannot make us allocate.
        if n > self.0.len() as u64 {
            return Err(SnapshotError::Damaged);
        }
        Ok(n as usize)
    }
    fn str(&mut self) -> Result<&'a str, SnapshotError> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| SnapshotError::Damaged)
    }
}

impl VerificationIndex {
    /// The whole index as bytes (with each account's applied sequence), so a restart can
    /// load it and replay only the events that follow. Ends with a BLAKE3 checksum.
    pub fn to_snapshot(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(
            64 + self.entries.len() * 80 + self.labels.len() + self.accounts.len() * 64,
        ));
        o.0.extend_from_slice(SNAPSHOT_MAGIC);
        o.len(self.accounts.len());
        for a in &self.accounts {
            o.bytes(a.id.as_bytes());
            o.bytes(a.login_email.as_bytes());
            o.u64(a.applied);
            o.len(a.entries.len());
            for e in &a.entries {
                o.u32(*e);
            }
        }
        o.len(self.entries.len());
        for e in &self.entries {
            o.0.extend_from_slice(&e.hash_tail);
            o.0.extend_from_slice(e.key_id.as_bytes());
            o.u64(e.expires_at as u64);
            o.u32(e.account);
            o.u32(e.label_start);
            o.u16(e.label_len);
            o.u8(e.status);
        }
        o.bytes(self.labels.as_bytes());
        o.len(self.by_prefix.len());
        for (prefix, slot) in &self.by_prefix {
            o.0.extend_from_slice(&prefix.0);
            o.u32(*slot);
        }
        o.len(self.legacy.len());
        for (username, candidates) in &self.legacy {
            o.bytes(username.as_bytes());
            o.len(candidates.len());
            for c in candidates {
                o.u32(c.entry);
                o.bytes(c.legacy_hash.as_bytes());
            }
        }
        o.len(self.first_use.len());
        for (new, old) in &self.first_use {
            o.0.extend_from_slice(new.as_bytes());
            o.0.extend_from_slice(old.as_bytes());
        }
        let sum = blake3::hash(&o.0);
        o.0.extend_from_slice(sum.as_bytes());
        o.0
    }

    /// An index from [`VerificationIndex::to_snapshot`]'s bytes, every reference checked.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() < SNAPSHOT_MAGIC.len() + 32 {
            return Err(SnapshotError::Format);
        }
        let v1 = &bytes[..8] == SNAPSHOT_MAGIC_V1;
        if !v1 && &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::Format);
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(SnapshotError::Damaged);
        }
        let mut i = In(&body[8..]);
        let mut ix = VerificationIndex::new();
        let accounts = i.len()?;
        ix.accounts.reserve(accounts);
        for n in 0..accounts {
            let id: Box<str> = i.str()?.into();
            let login_email = i.str()?.into();
            let applied = i.u64()?;
            let count = i.len()?;
            let entries = (0..count).map(|_| i.u32()).collect::<Result<Vec<_>, _>>()?;
            ix.account_ix.insert(id.clone(), n as u32);
            ix.accounts.push(Account {
                id,
                login_email,
                applied,
                entries,
            });
        }
        let entries = i.len()?;
        ix.entries.reserve(entries);
        for _ in 0..entries {
            ix.entries.push(Entry {
                hash_tail: i.array()?,
                key_id: Uuid::from_bytes(i.array()?),
                expires_at: i.u64()? as i64,
                account: i.u32()?,
                label_start: i.u32()?,
                label_len: i.u16()?,
                status: i.u8()?,
                uses: AtomicU32::new(0),
            });
        }
        ix.labels = i.str()?.to_owned();
        let prefixes = i.len()?;
        ix.by_prefix.reserve(prefixes);
        for _ in 0..prefixes {
            let prefix = Prefix(i.array()?);
            ix.by_prefix.insert(prefix, i.u32()?);
        }
        let usernames = i.len()?;
        for _ in 0..usernames {
            let username: Box<str> = i.str()?.into();
            let count = i.len()?;
            let mut candidates = Vec::with_capacity(count);
            for _ in 0..count {
                candidates.push(LegacyCandidate {
                    entry: i.u32()?,
                    legacy_hash: i.str()?.to_owned(),
                });
            }
            ix.legacy.insert(username, candidates);
        }
        let rotations = if v1 { 0 } else { i.len()? };
        for _ in 0..rotations {
            let new = Uuid::from_bytes(i.array()?);
            ix.first_use.insert(new, Uuid::from_bytes(i.array()?));
        }
        if !i.0.is_empty() || !ix.references_hold() {
            return Err(SnapshotError::Damaged);
        }
        Ok(ix)
    }

    /// Every slot, account and label span points inside the index.
    fn references_hold(&self) -> bool {
        let slots = self.entries.len() as u32;
        let accounts = self.accounts.len() as u32;
        self.accounts
            .iter()
            .all(|a| a.entries.iter().all(|s| *s < slots))
            && self.entries.iter().all(|e| {
                let (start, end) = (
                    e.label_start as usize,
                    e.label_start as usize + e.label_len as usize,
                );
                e.account < accounts
                    && end <= self.labels.len()
                    && self.labels.is_char_boundary(start)
                    && self.labels.is_char_boundary(end)
            })
            && self.by_prefix.values().all(|s| *s < slots)
            && self.legacy.values().flatten().all(|c| c.entry < slots)
    }

    /// Every account with the last sequence applied to it.
    pub fn applied_sequences(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.accounts.iter().map(|a| (&*a.id, a.applied))
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
    fn a_first_use_rotation_is_known_until_the_old_key_goes() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(10);
        let later = now + chrono::Duration::days(100);
        let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
        let (h_old, h_new) = ([1u8; 32], [2u8; 32]);
        let mut ix = VerificationIndex::new();
        ix.apply("acc", 1, &generated(old, &h_old, later));
        ix.apply("acc", 2, &generated(new, &h_new, later));
        ix.apply(
            "acc",
            3,
            &KeyringEvent::KeyRotated(keyledger_events::KeyRotated {
                command_id: Uuid::new_v4(),
                old_key_id: old,
                new_key_id: new,
                old_key_expires_at: later,
                rotated_at: now,
                revoke_old_on_first_use: true,
            }),
        );
        let retires = |ix: &VerificationIndex, h: &[u8; 32]| match ix.lookup(h, now) {
            Lookup::Valid(v) => v.retires(),
            other => panic!("expected valid, got {other:?}"),
        };
        assert_eq!(retires(&ix, &h_new), Some(old));
        assert_eq!(
            retires(&ix, &h_old),
            None,
            "only the successor's use counts"
        );
        let restored = VerificationIndex::from_snapshot(&ix.to_snapshot()).expect("snapshot");
        assert_eq!(
            retires(&restored, &h_new),
            Some(old),
            "kept in the snapshot"
        );
        ix.apply(
            "acc",
            4,
            &KeyringEvent::KeyRevoked(KeyRevoked {
                command_id: Uuid::new_v4(),
                key_id: old,
                revoked_at: now,
                cause: Some(keyledger_events::RevokeCause::Rotated),
                source: None,
                ..Default::default()
            }),
        );
        assert_eq!(retires(&ix, &h_new), None, "nothing left to retire");
    }

    #[test]
    fn a_format_1_snapshot_is_still_read() {
        let later = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(100);
        let mut ix = VerificationIndex::new();
        ix.apply("acc", 1, &generated(Uuid::new_v4(), &[3u8; 32], later));
        // Format 1 is format 2 without the (empty) first-use section.
        let v2 = ix.to_snapshot();
        let mut v1 = v2[..v2.len() - 32 - 8].to_vec();
        v1[..8].copy_from_slice(SNAPSHOT_MAGIC_V1);
        let sum = blake3::hash(&v1);
        v1.extend_from_slice(sum.as_bytes());
        let restored = VerificationIndex::from_snapshot(&v1).expect("format 1 reads");
        assert!(matches!(
            restored.lookup(&[3u8; 32], DateTime::<Utc>::UNIX_EPOCH),
            Lookup::Valid(_)
        ));
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
                cause: None,
                source: None,
                ..Default::default()
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

    #[test]
    fn a_snapshot_restores_the_same_answers_and_refuses_damage() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(10);
        let later = now + chrono::Duration::days(100);
        let mut ix = VerificationIndex::new();
        let keys: Vec<(Uuid, [u8; 32])> =
            (0..50u8).map(|n| (Uuid::new_v4(), [n + 1; 32])).collect();
        for (n, (id, hash)) in keys.iter().enumerate() {
            ix.apply(
                &format!("acc-{}", n % 7),
                (n / 7) as u64 + 1,
                &generated(*id, hash, later),
            );
        }
        ix.apply(
            "acc-0",
            99,
            &KeyringEvent::KeyRevoked(KeyRevoked {
                command_id: Uuid::new_v4(),
                key_id: keys[0].0,
                revoked_at: now,
                cause: None,
                source: None,
                ..Default::default()
            }),
        );
        let bytes = ix.to_snapshot();
        let back = VerificationIndex::from_snapshot(&bytes).expect("reads back");
        for (id, hash) in &keys {
            let (a, b) = (ix.lookup(hash, now), back.lookup(hash, now));
            match (a, b) {
                (Lookup::Valid(x), Lookup::Valid(y)) => {
                    assert_eq!(
                        (x.key_id(), x.account_id(), x.label()),
                        (y.key_id(), y.account_id(), y.label())
                    );
                    assert_eq!(y.key_id(), *id);
                }
                (x, y) => assert_eq!(format!("{x:?}"), format!("{y:?}")),
            }
        }
        assert_eq!(back.applied("acc-0"), 99);
        assert_eq!(back.stats().keys, 50);
        let mut damaged = bytes.clone();
        damaged[100] ^= 1;
        assert!(VerificationIndex::from_snapshot(&damaged).is_err());
        assert!(VerificationIndex::from_snapshot(&bytes[..bytes.len() - 1]).is_err());
        assert!(VerificationIndex::from_snapshot(b"not a snapshot at all, not at all").is_err());
    }
    fn v_again(ix: &VerificationIndex, hash: &[u8; 32], now: DateTime<Utc>) {
        if let Lookup::Valid(v) = ix.lookup(hash, now) {
            v.note_use();
        }
    }

    #[test]
    fn verifications_are_counted_and_drained_once() {
        let mut ix = VerificationIndex::new();
        let now = Utc::now();
        let hash = [7u8; 32];
        ix.apply(
            "acc",
            1,
            &generated(Uuid::from_u128(1), &hash, now + chrono::Duration::days(1)),
        );
        let Lookup::Valid(v) = ix.lookup(&hash, now) else {
            panic!("valid")
        };
        let key_id = v.key_id();
        for _ in 0..3 {
            v.note_use();
        }
        let (drained, next) = ix.drain_usage(0, 10);
        assert_eq!(next, None);
        assert_eq!(drained.len(), 1);
        assert_eq!((drained[0].key_id, drained[0].verifications), (key_id, 3));
        assert!(ix.drain_usage(0, 10).0.is_empty(), "drained once");
        v_again(&ix, &hash, now);
        assert_eq!(ix.drain_usage(0, 10).0[0].verifications, 1, "counted anew");
    }
}
