//! `keyledger audit`: replays the whole log — from the events topic or from the store —
//! and proves what happened to every key.
//!
//! Checks, per account: sequences start at 1 with no gap or repetition; the BLAKE3 hash
//! chain verifies (against the values carried on the topic, or recorded by the relay for
//! the store); the domain invariants hold over the history; no field looks like a plaintext
//! key. Then the read models rebuilt from nothing are compared with the live ones. The
//! auditor is a pure fold like the projections, so it is the same whatever the source.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Months, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use keyledger_events::{decode_event, KeyringEvent};
use keyledger_projections::{Listing, ListingRow};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde::Serialize;
use uuid::Uuid;

use crate::kafka::BusConfig;
use crate::store::Store;
use keyledger_events::chain;

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub account_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    pub message: String,
}

/// The report of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    pub source: String,
    pub passed: bool,
    pub events: u64,
    pub accounts: u64,
    pub duplicates_skipped: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub findings: Vec<Finding>,
    pub listing_rows: usize,
    pub listing_digest: String,
    /// `None` when not compared (`--until`, or no live listing reachable).
    pub live_listing_digest: Option<String>,
    pub listing_differences: Vec<String>,
    pub index_digest: String,
    pub live_index_digest: Option<String>,
    pub index_differences: Vec<String>,
    /// The rebuilt listing, with `--print-listing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listing: Option<Vec<ListingRow>>,
}

#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub account: Option<String>,
    pub until: Option<DateTime<Utc>>,
    /// Calendar months a key may live (the configured validity).
    pub validity_months: u32,
    pub print_listing: bool,
    /// The log's public key (`GET /v1/log-key`): signatures are checked when given.
    pub public_key: Option<keyledger_events::signature::LogKeys>,
}

#[derive(Default)]
struct KeyAudit {
    label: String,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    expired: bool,
    legacy: bool,
    key_hash: Option<String>,
    legacy_hash: Option<String>,
    /// Reminder stages decided (sent or skipped).
    reminded: std::collections::BTreeSet<u32>,
}

#[derive(Default)]
struct AccountAudit {
    last: u64,
    chains: Vec<[u8; 32]>,
    keys: HashMap<Uuid, KeyAudit>,
    /// The signature carried by the last event folded.
    last_signature: Option<String>,
}

/// The fold.
pub struct Auditor {
    opts: AuditOptions,
    accounts: BTreeMap<String, AccountAudit>,
    listing: Listing,
    findings: Vec<Finding>,
    events: u64,
    duplicates: u64,
    /// Reused for the canonical bytes of each event.
    buffer: Vec<u8>,
}

impl Auditor {
    pub fn new(opts: AuditOptions) -> Self {
        Self {
            opts,
            accounts: BTreeMap::new(),
            listing: Listing::default(),
            findings: Vec::new(),
            events: 0,
            duplicates: 0,
            buffer: Vec::with_capacity(1024),
        }
    }

    fn find(&mut self, check: &'static str, account: &str, sequence: Option<u64>, message: String) {
        self.findings.push(Finding {
            check,
            account_id: account.to_owned(),
            sequence,
            message,
        });
    }

    /// Folds one record of the events topic (its bytes, its key, where it was).
    pub fn feed_record(&mut self, bytes: &[u8], key: Option<&[u8]>, partition: i32, offset: i64) {
        match decode_event(bytes) {
            Ok(d) => {
                if key.is_some_and(|k| k != d.account_id.as_bytes()) {
                    self.find(
                        "format",
                        &d.account_id,
                        Some(d.sequence),
                        format!("record at {partition}/{offset} is not keyed by its account id"),
                    );
                    return;
                }
                self.feed(
                    &d.account_id,
                    d.sequence,
                    &d.event,
                    Some(&d.chain),
                    d.signature.as_deref(),
                    Some(bytes),
                )
            }
            Err(e) => self.find(
                "format",
                "",
                None,
                format!("record at {partition}/{offset}: {e}"),
            ),
        }
    }

    /// Takes in a fold of other accounts.
    fn merge(&mut self, other: Auditor) {
        self.accounts.extend(other.accounts);
        self.listing.merge(other.listing);
        self.findings.extend(other.findings);
        self.findings
            .sort_by(|a, b| (&a.account_id, a.sequence).cmp(&(&b.account_id, b.sequence)));
        self.events += other.events;
        self.duplicates += other.duplicates;
    }

    /// Events folded and findings so far.
    pub fn summary(&self) -> (u64, usize) {
        (self.events, self.findings.len())
    }

    /// The first `n` findings.
    pub fn first_findings(&self, n: usize) -> &[Finding] {
        &self.findings[..n.min(self.findings.len())]
    }

    /// Whether this event is in scope (`--account`, `--until`).
    pub fn wants(&self, account: &str, event: &KeyringEvent) -> bool {
        self.opts.account.as_deref().is_none_or(|a| a == account)
            && self
                .opts
                .until
                .is_none_or(|t| keyledger_projections::happened_by(event, t))
    }

    /// Folds one event; `carried` is the chain value the source holds for it, `signature`
    /// its signature, `raw` the bytes it was read from (scanned for secrets; the event is
    /// serialised when absent).
    pub fn feed(
        &mut self,
        account: &str,
        sequence: u64,
        event: &KeyringEvent,
        carried: Option<&str>,
        signature: Option<&str>,
        raw: Option<&[u8]>,
    ) {
        if !self.wants(account, event) {
            return;
        }
        if !self.accounts.contains_key(account) {
            self.accounts
                .insert(account.to_owned(), AccountAudit::default());
        }
        let Some(acc) = self.accounts.get_mut(account) else {
            return;
        };
        if sequence <= acc.last {
            let same = carried.and_then(chain::from_hex).is_some_and(|c| {
                acc.chains
                    .get(sequence as usize - 1)
                    .is_some_and(|known| *known == c)
            });
            let last = acc.last;
            let unsigned = self.opts.public_key.as_ref().is_some_and(|key| {
                let vouched = carried.and_then(chain::from_hex).zip(signature);
                !vouched.is_some_and(|(c, s)| key.verifies(&c, s))
            });
            if sequence >= 1 && same {
                self.duplicates += 1;
            } else if unsigned {
                self.find(
                    "signature",
                    account,
                    Some(sequence),
                    format!("a record for sequence {sequence} (last was {last}) that the log's key did not sign: a forgery"),
                );
            } else {
                self.find(
                    "sequence",
                    account,
                    Some(sequence),
                    format!("sequence {sequence} repeats (last was {last})"),
                );
            }
            return;
        }
        let expected = acc.last + 1;
        let gap = sequence != expected;
        let previous = acc.chains.last().copied().unwrap_or(chain::GENESIS);
        let computed = chain::next_with(&mut self.buffer, &previous, account, sequence, event);
        let carried_value = carried.and_then(chain::from_hex);
        // Re-anchor on the carried value, so one bad event is reported once, not for ever.
        let value = carried_value.unwrap_or(computed);
        acc.chains.resize(sequence as usize - 1, previous);
        acc.chains.push(value);
        acc.last = sequence;
        acc.last_signature = signature.map(str::to_owned);
        self.events += 1;
        if gap {
            self.find(
                "sequence",
                account,
                Some(expected),
                format!("sequence {expected} is missing (next found is {sequence})"),
            );
        }
        if let Some(c) = carried_value {
            if c != computed && !gap {
                self.find(
                    "chain",
                    account,
                    Some(sequence),
                    "the hash chain does not verify: the event was changed, removed or reordered"
                        .into(),
                );
            }
        }
        self.check_invariants(account, sequence, event);
        self.check_secrets(account, sequence, event, raw);
        self.listing.apply(account, sequence, event);
    }

    fn check_invariants(&mut self, account: &str, seq: u64, event: &KeyringEvent) {
        let months = self.opts.validity_months;
        let mut problems: Vec<String> = Vec::new();
        let Some(acc) = self.accounts.get_mut(account) else {
            return;
        };
        let live_label_taken = |keys: &HashMap<Uuid, KeyAudit>, label: &str| {
            keys.values().any(|k| !k.revoked && k.label == label)
        };
        match event {
            KeyringEvent::KeyGenerated(e) => {
                if acc.keys.contains_key(&e.key_id) {
                    problems.push(format!("key {} is generated twice", e.key_id));
                }
                if live_label_taken(&acc.keys, &e.label) {
                    problems.push(format!("label '{}' is not unique in the account", e.label));
                }
                let limit = e
                    .created_at
                    .checked_add_months(Months::new(months))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                if e.expires_at > limit {
                    problems.push(format!(
                        "key {} expires more than {months} months after its creation",
                        e.key_id
                    ));
                }
                acc.keys.insert(
                    e.key_id,
                    KeyAudit {
                        label: e.label.clone(),
                        expires_at: Some(e.expires_at),
                        key_hash: Some(e.key_hash.clone()),
                        ..KeyAudit::default()
                    },
                );
            }
            KeyringEvent::LegacyKeyMigrated(e) => {
                if acc.keys.values().any(|k| k.legacy) {
                    problems.push("a second legacy key was migrated".into());
                }
                if live_label_taken(&acc.keys, &e.label) {
                    problems.push(format!("label '{}' is not unique in the account", e.label));
                }
                acc.keys.insert(
                    e.key_id,
                    KeyAudit {
                        label: e.label.clone(),
                        expires_at: Some(e.expires_at),
                        legacy: true,
                        legacy_hash: Some(e.legacy_hash.clone()),
                        ..KeyAudit::default()
                    },
                );
            }
            other => {
                let (key_id, at) = match other {
                    KeyringEvent::ContactsUpdated(e) => (e.key_id, e.updated_at),
                    KeyringEvent::KeyRevoked(e) => (e.key_id, e.revoked_at),
                    KeyringEvent::KeyRotated(e) => (e.old_key_id, e.rotated_at),
                    KeyringEvent::KeyExpired(e) => (e.key_id, e.expired_at),
                    KeyringEvent::ExpiryReminderDue(e) => (e.key_id, e.due_at),
                    _ => unreachable!("handled above"),
                };
                match acc.keys.get_mut(&key_id) {
                    None => {
                        problems.push(format!("{} names unknown key {key_id}", other.event_type()))
                    }
                    Some(k) if k.revoked => {
                        problems.push(format!("{} on revoked key {key_id}", other.event_type()))
                    }
                    Some(k) => match other {
                        KeyringEvent::KeyRevoked(_) => k.revoked = true,
                        KeyringEvent::KeyExpired(e) => {
                            if k.expires_at.is_some_and(|x| e.expired_at < x) {
                                problems.push(format!(
                                    "key {key_id} recorded expired before its expiry"
                                ));
                            }
                            k.expired = true;
                        }
                        KeyringEvent::KeyRotated(e) => {
                            if k.expires_at.is_some_and(|x| e.old_key_expires_at > x) {
                                problems.push(format!("rotation extended key {key_id}"));
                            }
                            if k.expires_at.is_some_and(|x| at >= x) || k.expired {
                                problems.push(format!("expired key {key_id} was rotated"));
                            }
                            k.expires_at = Some(e.old_key_expires_at);
                        }
                        KeyringEvent::ExpiryReminderDue(_)
                            if k.expired || k.expires_at.is_some_and(|x| at > x) =>
                        {
                            problems.push(format!("reminder for key {key_id} after its expiry"));
                        }
                        KeyringEvent::ExpiryReminderDue(e) => {
                            for stage in std::iter::once(&e.stage).chain(&e.skipped_stages) {
                                if !k.reminded.insert(*stage) {
                                    problems.push(format!(
                                        "reminder stage {stage} of key {key_id} decided twice"
                                    ));
                                }
                            }
                        }
                        _ => {}
                    },
                }
            }
        }
        for p in problems {
            self.find("invariant", account, Some(seq), p);
        }
    }

    fn check_secrets(&mut self, account: &str, seq: u64, event: &KeyringEvent, raw: Option<&[u8]>) {
        let found = match raw {
            Some(bytes) => crate::domain::api_key::contains_key_shaped(bytes),
            None => crate::domain::api_key::contains_key_shaped(
                &serde_json::to_vec(event).unwrap_or_default(),
            ),
        };
        if found {
            self.find(
                "secrets",
                account,
                Some(seq),
                "a field looks like a plaintext key".into(),
            );
        }
    }

    /// Checks, with the log's public key, the signature of each account's last event: its
    /// chain value covers every event before it (each recomputed here), so one valid
    /// signature vouches for the account's whole history. Batches of 256, one by one only
    /// to name a failure.
    fn check_signatures(&mut self) {
        let Some(key) = self.opts.public_key.clone() else {
            return;
        };
        let heads: Vec<(String, u64, [u8; 32], Option<String>)> = self
            .accounts
            .iter()
            .filter_map(|(a, acc)| {
                let chain = *acc.chains.last()?;
                Some((a.clone(), acc.last, chain, acc.last_signature.clone()))
            })
            .collect();
        for chunk in heads.chunks(256) {
            let signed: Vec<([u8; 32], &str)> = chunk
                .iter()
                .filter_map(|(_, _, c, s)| s.as_deref().map(|s| (*c, s)))
                .collect();
            if signed.len() == chunk.len() && key.all_verify(&signed) {
                continue;
            }
            for (account, sequence, chain, signature) in chunk {
                let message = match signature {
                    None => "the last event carries no signature",
                    Some(s) if key.verifies(chain, s) => continue,
                    Some(_) => "the signature does not verify under the log's key: this history was not written by keyledger, or was changed",
                };
                self.find("signature", account, Some(*sequence), message.into());
            }
        }
    }

    /// Finishes: the signatures, then the rebuilt listing and index digests.
    fn finish(mut self, report: &mut AuditReport) -> (Vec<ListingRow>, Vec<String>) {
        self.check_signatures();
        report.events = self.events;
        report.accounts = self.accounts.len() as u64;
        report.duplicates_skipped = self.duplicates;
        report.findings = self.findings;
        let rows = self.listing.all_rows();
        report.listing_rows = rows.len();
        report.listing_digest = digest(rows.iter().map(row_line));
        let index: Vec<String> = self
            .accounts
            .iter()
            .flat_map(|(a, acc)| {
                acc.keys.iter().map(move |(id, k)| {
                    let status = if k.revoked {
                        "revoked"
                    } else if k.expired {
                        "expired"
                    } else {
                        "active"
                    };
                    format!(
                        "{a}|{id}|{}|{}|{}|{}|{status}",
                        k.key_hash.as_deref().unwrap_or(""),
                        k.legacy_hash.as_deref().unwrap_or(""),
                        k.label,
                        k.expires_at.map(|t| t.timestamp_micros()).unwrap_or(0)
                    )
                })
            })
            .collect();
        let mut index = index;
        index.sort();
        report.index_digest = digest(index.iter().cloned());
        (rows, index)
    }
}
fn row_line(r: &ListingRow) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}|{}|{}",
        r.account_id,
        r.key_id,
        r.label,
        r.last_five,
        r.contacts.join(","),
        r.created_at.timestamp_micros(),
        r.expires_at.timestamp_micros(),
        r.status.as_str()
    )
}

fn digest(lines: impl Iterator<Item = String>) -> String {
    let mut h = blake3::Hasher::new();
    for l in lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// Lines in one list and not the other (at most 20 of each).
fn differences(rebuilt: &[String], live: &[String]) -> Vec<String> {
    let a: std::collections::BTreeSet<&String> = rebuilt.iter().collect();
    let b: std::collections::BTreeSet<&String> = live.iter().collect();
    let mut out: Vec<String> = a
        .difference(&b)
        .take(20)
        .map(|l| format!("rebuilt only: {l}"))
        .collect();
    out.extend(b.difference(&a).take(20).map(|l| format!("live only: {l}")));
    out
}

fn progress(total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos} events {per_sec} elapsed {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Replays the store (one account's events, or every page of the log).
pub async fn from_store(store: &Store, opts: AuditOptions) -> anyhow::Result<Auditor> {
    let mut auditor = Auditor::new(opts.clone());
    let bar = progress(None);
    let mut pages = store.pages();
    let mut one = match &opts.account {
        Some(a) => Some(vec![(a.clone(), store.events_after(a, 0).await?)]),
        None => None,
    };
    loop {
        let page = match (&opts.account, one.take()) {
            (Some(_), Some(page)) => page,
            (Some(_), None) => break,
            (None, _) => match pages.next().await? {
                Some(page) => page,
                None => break,
            },
        };
        let keys: Vec<(String, u64)> = page
            .iter()
            .flat_map(|(a, records)| records.iter().map(move |r| (a.clone(), r.sequence)))
            .collect();
        let recorded = store.recorded_chains(&keys).await?;
        for r in page.iter().flat_map(|(_, records)| records) {
            // The value written with the event; else the one the relay recorded.
            let carried = r.chain.as_deref().or_else(|| {
                recorded
                    .get(&(r.account_id.clone(), r.sequence))
                    .map(String::as_str)
            });
            auditor.feed(
                &r.account_id,
                r.sequence,
                &r.event,
                carried,
                r.signature.as_deref(),
                None,
            );
        }
        bar.inc(keys.len() as u64);
    }
    bar.finish_and_clear();
    Ok(auditor)
}

/// Replays the events topic from the beginning to its end as of the start, outside any
/// consumer group. Blocking: run it on a blocking thread.
pub fn from_kafka(bus: &BusConfig, opts: AuditOptions) -> anyhow::Result<Auditor> {
    let topic = bus.events_topic();
    let probe: BaseConsumer = bus.client_config().create()?;
    let metadata = probe.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut starts: Vec<(i32, i64)> = Vec::new();
    let mut auditor = Auditor::new(opts);
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = probe.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
            starts.push((p.id(), low));
            if low > 0 {
                // The log must start at offset 0: an event log that lost its beginning
                // cannot prove what happened to any key whose events were there.
                auditor.find(
                    "history",
                    "",
                    None,
                    format!(
                        "{topic} partition {} starts at offset {low}, not 0: records 0..{low} were deleted (retention or delete-records), so history before offset {low} is missing",
                        p.id()
                    ),
                );
            }
            if high > low {
                ends.insert(p.id(), high);
            }
        }
    }
    let consumer: BaseConsumer = bus.reader(&topic, &starts)?;
    let total: i64 = ends
        .iter()
        .map(|(p, high)| {
            high - starts
                .iter()
                .find(|(q, _)| q == p)
                .map(|(_, low)| *low)
                .unwrap_or(0)
        })
        .sum();
    let bar = progress(Some(total.max(0) as u64));
    // Accounts are independent: each worker folds the accounts whose records it is given
    // (by the record's key, the account id), and the folds are merged at the end. The
    // consumer thread only reads and routes.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let opts = auditor.opts.clone();
    let mut queues = Vec::with_capacity(workers);
    let mut folds = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Routed>>(16);
        let mut fold = Auditor::new(opts.clone());
        queues.push(tx);
        folds.push(std::thread::spawn(move || {
            for batch in rx {
                for r in batch {
                    fold.feed_record(&r.bytes, r.key.as_deref(), r.partition, r.offset);
                }
            }
            fold
        }));
    }
    let mut pending: Vec<Vec<Routed>> = (0..workers)
        .map(|_| Vec::with_capacity(ROUTE_BATCH))
        .collect();
    let mut idle = Instant::now();
    let mut failure = None;
    while !ends.is_empty() {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            if idle.elapsed() >= Duration::from_secs(60) {
                failure = Some(anyhow::anyhow!("the broker stopped delivering the topic"));
                break;
            }
            continue;
        };
        idle = Instant::now();
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                failure = Some(e.into());
                break;
            }
        };
        let (p, o) = (m.partition(), m.offset());
        if ends.get(&p).is_some_and(|end| o + 1 >= *end) {
            ends.remove(&p);
        }
        bar.inc(1);
        let key = m.key();
        let worker = key.map(|k| fnv(k) as usize % workers).unwrap_or(0);
        pending[worker].push(Routed {
            bytes: m.payload().unwrap_or_default().to_vec(),
            key: key.map(<[u8]>::to_vec),
            partition: p,
            offset: o,
        });
        if pending[worker].len() >= ROUTE_BATCH {
            let full = std::mem::replace(&mut pending[worker], Vec::with_capacity(ROUTE_BATCH));
            if queues[worker].send(full).is_err() {
                failure = Some(anyhow::anyhow!("an audit worker stopped"));
                break;
            }
        }
    }
    for (queue, batch) in queues.into_iter().zip(pending) {
        let _ = queue.send(batch);
    }
    for fold in folds {
        let fold = fold
            .join()
            .map_err(|_| anyhow::anyhow!("an audit worker panicked"))?;
        auditor.merge(fold);
    }
    bar.finish_and_clear();
    match failure {
        Some(e) => Err(e),
        None => Ok(auditor),
    }
}

/// Records handed to a worker at a time.
const ROUTE_BATCH: usize = 256;

/// One record on its way to the worker of its account.
struct Routed {
    bytes: Vec<u8>,
    key: Option<Vec<u8>>,
    partition: i32,
    offset: i64,
}

/// FNV-1a: spreads account ids over the workers.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Completes a run: digests, comparison with the live read models, the verdict.
pub async fn conclude(
    auditor: Auditor,
    source: &str,
    started: Instant,
    live: Option<&Store>,
) -> anyhow::Result<AuditReport> {
    let mut report = AuditReport {
        source: source.to_owned(),
        ..AuditReport::default()
    };
    let opts = auditor.opts.clone();
    let (rows, index) = auditor.finish(&mut report);
    report.seconds = started.elapsed().as_secs_f64();
    report.events_per_second = report.events as f64 / report.seconds.max(1e-9);
    if let (Some(store), None) = (live, opts.until) {
        let mut live_rows = crate::read_side::listing::rows(store, None).await?;
        if let Some(a) = &opts.account {
            live_rows.retain(|r| &r.account_id == a);
        }
        let rebuilt: Vec<String> = rows.iter().map(row_line).collect();
        let live_lines: Vec<String> = live_rows.iter().map(row_line).collect();
        report.live_listing_digest = Some(digest(live_lines.iter().cloned()));
        report.listing_differences = differences(&rebuilt, &live_lines);
        // The persisted index (PostgreSQL with the bus).
        let persisted = crate::read_side::index::rows(store).await?;
        if !persisted.is_empty() {
            let mut live_index: Vec<String> = persisted
                .iter()
                .filter(|r| opts.account.as_deref().is_none_or(|a| a == r.account_id))
                .map(|r| {
                    format!(
                        "{}|{}|{}|{}|{}|{}|{}",
                        r.account_id,
                        r.key_id,
                        r.key_hash.as_deref().unwrap_or(""),
                        r.legacy_hash.as_deref().unwrap_or(""),
                        r.label,
                        r.expires_at.timestamp_micros(),
                        r.status
                    )
                })
                .collect();
            live_index.sort();
            report.live_index_digest = Some(digest(live_index.iter().cloned()));
            report.index_differences = differences(&index, &live_index);
        }
    }
    if opts.print_listing {
        report.listing = Some(rows);
    }
    report.passed = report.findings.is_empty()
        && report.listing_differences.is_empty()
        && report.index_differences.is_empty();
    Ok(report)
}

/// The report for a person.
pub fn human(report: &AuditReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "keyledger audit — source: {}", report.source);
    let _ = writeln!(
        s,
        "{} events in {} accounts ({} duplicate records skipped), {:.2} s, {:.0} events/s",
        report.events,
        report.accounts,
        report.duplicates_skipped,
        report.seconds,
        report.events_per_second
    );
    for check in [
        "history",
        "sequence",
        "chain",
        "invariant",
        "secrets",
        "format",
    ] {
        let n = report.findings.iter().filter(|f| f.check == check).count();
        let _ = writeln!(
            s,
            "  {check:<10} {}",
            if n == 0 {
                "ok".to_owned()
            } else {
                format!("FAILED ({n})")
            }
        );
    }
    let compare = |live: &Option<String>, diffs: &[String]| match live {
        None => "not compared".to_owned(),
        Some(_) if diffs.is_empty() => "ok (rebuilt = live)".to_owned(),
        Some(_) => format!("FAILED ({} differences)", diffs.len()),
    };
    let _ = writeln!(
        s,
        "  {:<10} {} — {} rows, digest {}",
        "listing",
        compare(&report.live_listing_digest, &report.listing_differences),
        report.listing_rows,
        &report.listing_digest[..16]
    );
    let _ = writeln!(
        s,
        "  {:<10} {} — digest {}",
        "index",
        compare(&report.live_index_digest, &report.index_differences),
        &report.index_digest[..16]
    );
    for f in &report.findings {
        let at = f.sequence.map(|q| format!("#{q}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  FAIL {} {}{}: {}",
            f.check, f.account_id, at, f.message
        );
    }
    for d in report
        .listing_differences
        .iter()
        .chain(&report.index_differences)
    {
        let _ = writeln!(s, "  DIFF {d}");
    }
    let _ = writeln!(s, "RESULT: {}", if report.passed { "PASS" } else { "FAIL" });
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyledger_events::{ContactsUpdated, KeyGenerated, KeyRevoked};

    fn opts() -> AuditOptions {
        AuditOptions {
            account: None,
            until: None,
            validity_months: 6,
            print_listing: false,
            public_key: None,
        }
    }

    fn generated(key: u128, label: &str, months: u32) -> KeyringEvent {
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        KeyringEvent::KeyGenerated(KeyGenerated {
            command_id: Uuid::from_u128(key),
            key_id: Uuid::from_u128(key),
            label: label.into(),
            last_five: "abcde".into(),
            key_hash: "0".repeat(64),
            hash_scheme: keyledger_events::HASH_SCHEME_BLAKE3.into(),
            contacts: vec![],
            login_email: "a@agency.gov.sg".into(),
            created_at: t0,
            expires_at: t0.checked_add_months(Months::new(months)).expect("time"),
            rotated_from: None,
        })
    }

    fn checks(a: &Auditor) -> Vec<(&'static str, u64)> {
        a.findings
            .iter()
            .map(|f| (f.check, f.sequence.unwrap_or(0)))
            .collect()
    }

    #[test]
    fn invariants_over_the_history() {
        let t = DateTime::<Utc>::UNIX_EPOCH;
        let mut a = Auditor::new(opts());
        a.feed("acc", 1, &generated(1, "prod", 6), None, None, None);
        a.feed("acc", 2, &generated(2, "prod", 6), None, None, None);
        a.feed("acc", 3, &generated(3, "long", 7), None, None, None);
        a.feed(
            "acc",
            4,
            &KeyringEvent::KeyRevoked(KeyRevoked {
                command_id: Uuid::nil(),
                key_id: Uuid::from_u128(1),
                revoked_at: t,
                cause: None,
                source: None,
                ..Default::default()
            }),
            None,
            None,
            None,
        );
        a.feed(
            "acc",
            5,
            &KeyringEvent::ContactsUpdated(ContactsUpdated {
                command_id: Uuid::nil(),
                key_id: Uuid::from_u128(1),
                contacts: vec![],
                updated_at: t,
            }),
            None,
            None,
            None,
        );
        assert_eq!(
            checks(&a),
            vec![("invariant", 2), ("invariant", 3), ("invariant", 5)]
        );
    }

    #[test]
    fn a_plaintext_key_in_a_field_is_reported() {
        let mut a = Auditor::new(opts());
        let leaked = format!("oops johndoe_v1_{}", "A".repeat(44));
        a.feed("acc", 1, &generated(1, &leaked, 6), None, None, None);
        assert_eq!(checks(&a), vec![("secrets", 1)]);
    }

    #[test]
    fn gaps_repeats_and_chain_breaks_are_named() {
        let mut a = Auditor::new(opts());
        let e1 = generated(1, "a", 6);
        let c1 = chain::next(&chain::GENESIS, "acc", 1, &e1);
        a.feed("acc", 1, &e1, Some(&chain::to_hex(&c1)), None, None);
        a.feed("acc", 1, &e1, Some(&chain::to_hex(&c1)), None, None);
        assert_eq!(
            a.duplicates, 1,
            "an identical republished record is skipped"
        );
        a.feed("acc", 3, &generated(3, "c", 6), None, None, None);
        a.feed(
            "acc",
            4,
            &generated(4, "d", 6),
            Some(&"0".repeat(64)),
            None,
            None,
        );
        assert_eq!(checks(&a), vec![("sequence", 2), ("chain", 4)]);
    }
}
