//! Verify on an index of 1,000,000 keys (hit, miss, expired, malformed), and key minting;
//! a valid key with and without usage counted (`*_usage_off` / `*_usage_on`).
//!
//! Run: `cargo bench --bench verify`. Set KEYLEDGER_BENCH_KEYS to change the index size.
//! Memory per key is printed before the timings: the index's own accounting of its heap
//! and the process's resident-set growth while building it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use keyledger::domain::{mint_key, KeyHasher};
use keyledger::read_side::ReadSide;
use keyledger_events::{KeyGenerated, KeyringEvent, HASH_SCHEME_BLAKE3};
use keyledger_projections::VerificationIndex;
use uuid::Uuid;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

struct Fixture {
    read_side: ReadSide,
    hits: Vec<String>,
    expired: Vec<String>,
    misses: Vec<String>,
    now: DateTime<Utc>,
}

fn fixture(n: usize) -> Fixture {
    let hasher = KeyHasher::new(b"benchmark pepper benchmark pepper benchmark");
    let now = Utc::now();
    let valid_until = now + chrono::Duration::days(180);
    let expired_at = now - chrono::Duration::days(1);
    let mut hits = Vec::new();
    let mut expired = Vec::new();
    let mut events = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let minted = mint_key("johndoe", &hasher);
        let is_expired = i % 100 == 0;
        if is_expired && expired.len() < 1000 {
            expired.push(minted.plaintext.expose().to_owned());
        } else if !is_expired && hits.len() < 100_000 && i % 7 == 1 {
            hits.push(minted.plaintext.expose().to_owned());
        }
        events.push((
            format!("account-{}", i / 20),
            (i % 20 + 1) as u64,
            KeyringEvent::KeyGenerated(KeyGenerated {
                command_id: Uuid::now_v7(),
                key_id: Uuid::now_v7(),
                label: format!("key {}", i % 20),
                last_five: minted.last_five,
                key_hash: minted.key_hash,
                hash_scheme: HASH_SCHEME_BLAKE3.into(),
                contacts: vec![],
                login_email: "john.doe@agency.gov.sg".into(),
                created_at: now,
                expires_at: if is_expired { expired_at } else { valid_until },
                rotated_from: None,
            }),
        ));
    }
    let minted_in = started.elapsed();
    let rss_before = rss_bytes();
    let mut index = VerificationIndex::new();
    let started = Instant::now();
    for (account, seq, event) in &events {
        index.apply(account, *seq, event);
    }
    index.shrink_to_fit();
    let built_in = started.elapsed();
    let rss_after = rss_bytes();
    drop(events);
    let stats = index.stats();
    eprintln!(
        "index: {} keys, {} accounts; minted in {:.2?}, folded in {:.2?} ({:.0} events/s)",
        stats.keys,
        stats.accounts,
        minted_in,
        built_in,
        n as f64 / built_in.as_secs_f64()
    );
    eprintln!(
        "memory: {:.1} bytes/key by the index's own accounting; {:.1} bytes/key resident-set growth while folding",
        stats.heap_bytes as f64 / n as f64,
        rss_after.saturating_sub(rss_before) as f64 / n as f64
    );
    let misses = (0..1000)
        .map(|_| mint_key("johndoe", &hasher).plaintext.expose().to_owned())
        .collect();
    Fixture {
        read_side: ReadSide::with_index(hasher, None, index),
        hits,
        expired,
        misses,
        now,
    }
}

/// One verify answered from the index (the verdict borrowed, as the HTTP route does).
#[inline]
fn borrowed(f: &Fixture, key: &str) -> Option<Uuid> {
    black_box(
        f.read_side
            .verify_with(black_box(key), None, f.now, |v| v.map(|v| v.key.key_id()))
            .ok(),
    )
}

/// Usage counted and not, interleaved in short slices (this is a shared virtual machine:
/// its speed drifts over seconds, which would fall on one side of two back-to-back
/// criterion runs): the median time per verify of each side, in ns.
fn usage_interleaved(f: &Fixture, pool: &[String]) -> (f64, f64) {
    const SLICES: usize = 40;
    const ITERS: usize = 50_000;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let mut i = 0usize;
    for slice in 0..SLICES * 2 {
        // on, off, off, on, on, off, …: neither side always goes first.
        let tracking = matches!(slice % 4, 0 | 3);
        f.read_side.set_usage_tracking(tracking);
        let started = Instant::now();
        for _ in 0..ITERS {
            i = (i + 1) % pool.len();
            borrowed(f, &pool[i]);
        }
        let ns = started.elapsed().as_nanos() as f64 / ITERS as f64;
        if tracking {
            on.push(ns)
        } else {
            off.push(ns)
        }
    }
    f.read_side.set_usage_tracking(true);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    (median(&mut on), median(&mut off))
}

fn bench(c: &mut Criterion) {
    let n = std::env::var("KEYLEDGER_BENCH_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let f = fixture(n);
    assert!(f.read_side.verify(&f.hits[0], None, f.now).is_ok());
    assert!(f.read_side.verify(&f.expired[0], None, f.now).is_err());
    for (name, pool) in [("hot", &f.hits[..1000]), ("cold", &f.hits[..])] {
        let (on, off) = usage_interleaved(&f, pool);
        eprintln!(
            "usage, {name} key, interleaved (40 slices of 50,000 verifies each side): counted {on:.1} ns, \
             not counted {off:.1} ns per verify: rate with usage {:.3}x the rate without",
            off / on
        );
    }
    let mut g = c.benchmark_group(format!("verify_{n}_keys"));
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    // "hot": 1,000 keys cycled (their cache lines stay in the CPU caches, as a busy
    // sender's keys do); "cold": 100,000 keys cycled (most lookups go to DRAM).
    let hot = &f.hits[..1000];
    let cold = &f.hits[..];
    let mut i = 0usize;
    for (name, pool) in [("hit_hot_borrowed", hot), ("hit_cold_borrowed", cold)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % pool.len();
                borrowed(&f, &pool[i])
            })
        });
    }
    // What counting usage costs: the same two cases with it off (the figures above have
    // it on, as the service runs), then on again, so a drift falls on both.
    for (name, pool, on) in [
        ("hit_hot_borrowed_usage_off", hot, false),
        ("hit_hot_borrowed_usage_on", hot, true),
        ("hit_cold_borrowed_usage_off", cold, false),
        ("hit_cold_borrowed_usage_on", cold, true),
    ] {
        f.read_side.set_usage_tracking(on);
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % pool.len();
                borrowed(&f, &pool[i])
            })
        });
    }
    f.read_side.set_usage_tracking(true);
    for (name, pool) in [("hit_hot_owned", hot), ("hit_cold_owned", cold)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % pool.len();
                black_box(f.read_side.verify(black_box(&pool[i]), None, f.now))
            })
        });
    }
    g.bench_function("hit_hot_with_from", |b| {
        b.iter(|| {
            i = (i + 1) % hot.len();
            black_box(
                f.read_side
                    .verify(black_box(&hot[i]), Some("john.doe@agency.gov.sg"), f.now),
            )
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            i = (i + 1) % f.misses.len();
            black_box(f.read_side.verify(black_box(&f.misses[i]), None, f.now))
        })
    });
    g.bench_function("expired", |b| {
        b.iter(|| {
            i = (i + 1) % f.expired.len();
            black_box(f.read_side.verify(black_box(&f.expired[i]), None, f.now))
        })
    });
    g.bench_function("malformed", |b| {
        b.iter(|| {
            black_box(
                f.read_side
                    .verify(black_box("johndoe_v1_tooshort"), None, f.now),
            )
        })
    });
    g.finish();
    let hasher = KeyHasher::new(b"benchmark pepper benchmark pepper benchmark");
    c.bench_function("mint_key", |b| {
        b.iter(|| black_box(mint_key(black_box("johndoe"), &hasher)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
