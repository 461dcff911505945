//! The bus, measured next to its bare parts. `keyledger bench commands`: a load tool for
//! the bus, next to the raw rates of the same broker and database; `keyledger bench audit`
//! (at the end): the audit replay next to a bare consumer of the same topic.
//!
//! Against a running keyledger (all roles) it measures, in one go:
//! 1. the raw database rate: single-row INSERT + COMMIT from one connection;
//! 2. the raw broker rate: a bare idempotent producer (500-byte values) and a bare consumer;
//! 3. GenerateKey commands over the bus at full speed: throughput (command produced → its
//!    result on the results topic) and end-to-end latency (produced → listing row visible);
//! 4. the same commands paced at half of the measured peak: latency p50/p99.
//!
//! It prints a Markdown table (for docs/PERFORMANCE.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureRecord;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

use super::percentile;
use keyledger::kafka::BusConfig;

pub struct LoadSettings {
    pub database_url: String,
    pub bus: BusConfig,
    pub commands: usize,
    pub accounts: usize,
    pub raw: usize,
}

async fn raw_database(pool: &PgPool, n: usize) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_commits (id bigserial PRIMARY KEY, v text NOT NULL)",
    )
    .execute(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    for i in 0..n {
        sqlx::query("INSERT INTO bench_raw_commits (v) VALUES ($1)")
            .bind(format!("row {i}"))
            .execute(&mut *conn)
            .await?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_raw_commits")
        .execute(&mut *conn)
        .await?;
    Ok(rate)
}

async fn raw_broker(bus: &BusConfig, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut raw = bus.clone();
    raw.topic_prefix = format!(
        "{}bench-raw-{}.",
        bus.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    raw.ensure_topics().await?;
    let topic = raw.events_topic();
    let producer = bus.producer(2)?;
    let value = vec![b'x'; 500];
    let started = Instant::now();
    let sends: Vec<_> = (0..n)
        .map(|i| {
            let (p, t, v, k) = (
                producer.clone(),
                topic.clone(),
                value.clone(),
                format!("k{}", i % 64),
            );
            async move {
                p.send(
                    FutureRecord::to(&t).key(&k).payload(&v),
                    Duration::from_secs(30),
                )
                .await
            }
        })
        .collect();
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    let produce_rate = n as f64 / started.elapsed().as_secs_f64();
    let consume_rate = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let consumer: BaseConsumer = raw.reader(&topic, &[])?;
        let started = Instant::now();
        let mut got = 0;
        while got < n && started.elapsed() < Duration::from_secs(120) {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                m?;
                got += 1;
            }
        }
        Ok(got as f64 / started.elapsed().as_secs_f64())
    })
    .await??;
    Ok((produce_rate, consume_rate))
}

/// What one run of commands measured.
struct Run {
    /// Commands per second, first produced to last listed.
    rate: f64,
    /// Produced → listing row visible, sorted (ms).
    latencies: Vec<f64>,
    /// The projection's lag: command decided (the key's creation time) → listing row
    /// visible, sorted (ms; the table is polled every 20 ms).
    lags: Vec<f64>,
}

/// Sends `n` GenerateKey commands, `pace` apart (none: as fast as possible).
async fn commands(
    s: &LoadSettings,
    pool: &PgPool,
    n: usize,
    pace: Option<Duration>,
    run: &str,
) -> anyhow::Result<Run> {
    let producer = s.bus.producer(2)?;
    let reply = STANDARD.encode(
        crypto_box::SecretKey::generate(&mut rand::rngs::OsRng)
            .public_key()
            .as_bytes(),
    );
    let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(n);
    let mut listed_at: HashMap<String, (Instant, f64)> = HashMap::with_capacity(n);
    let started = Instant::now();
    let account_prefix = format!("bench-{run}-");
    let poll = |pool: PgPool, prefix: String| async move {
        // The lag of the projection: the key's creation (the command decided) to this read.
        sqlx::query(
            "SELECT label, (extract(epoch FROM clock_timestamp() - created_at) * 1000)::float8 \
             AS lag_ms FROM key_listing WHERE account_id LIKE $1",
        )
        .bind(format!("{prefix}%"))
        .fetch_all(&pool)
        .await
    };
    let mut pending = Vec::new();
    for i in 0..n {
        let account = format!("{account_prefix}{}", i % s.accounts);
        let label = format!("{run}-{i}");
        let envelope = json!({
            "command_id": uuid::Uuid::now_v7(), "account_id": account, "issued_by": "bench",
            "command": {"type": "GenerateKey", "label": label, "contacts": ["ops@agency.gov.sg"], "login_email": "bench.user@agency.gov.sg"},
            "reply_public_key": reply,
        });
        let bytes = serde_json::to_vec(&envelope)?;
        let (p, t) = (producer.clone(), s.bus.commands_topic());
        sent_at.insert(label, Instant::now());
        pending.push(tokio::spawn(async move {
            p.send(
                FutureRecord::to(&t).key(&account).payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .map(|_| ())
        }));
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
            if i % 20 == 0 {
                for r in poll(pool.clone(), account_prefix.clone()).await? {
                    let l: String = r.get("label");
                    let lag: f64 = r.get("lag_ms");
                    listed_at.entry(l).or_insert_with(|| (Instant::now(), lag));
                }
            }
        }
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while listed_at.len() < n && Instant::now() < deadline {
        for r in poll(pool.clone(), account_prefix.clone()).await? {
            let l: String = r.get("label");
            let lag: f64 = r.get("lag_ms");
            listed_at.entry(l).or_insert_with(|| (Instant::now(), lag));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = listed_at
        .values()
        .map(|(t, _)| *t)
        .max()
        .map(|t| t.duration_since(started))
        .unwrap_or_default();
    let mut lags: Vec<f64> = listed_at.values().map(|(_, lag)| *lag).collect();
    lags.sort_by(f64::total_cmp);
    let mut latencies: Vec<f64> = listed_at
        .iter()
        .filter_map(|(l, (t, _))| {
            sent_at
                .get(l)
                .map(|s| t.duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    anyhow::ensure!(
        latencies.len() == n,
        "only {} of {n} commands reached the listing",
        latencies.len()
    );
    Ok(Run {
        rate: n as f64 / elapsed.as_secs_f64(),
        latencies,
        lags,
    })
}

pub async fn run(s: LoadSettings) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&s.database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    eprintln!("raw database: {} single-row commits…", s.raw);
    let db = raw_database(&pool, s.raw).await?;
    eprintln!("raw broker: {} records…", s.raw * 4);
    let (produce, consume) = raw_broker(&s.bus, s.raw * 4).await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    eprintln!(
        "GenerateKey over the bus at full speed: {} commands over {} accounts…",
        s.commands, s.accounts
    );
    let full = commands(&s, &pool, s.commands, None, &format!("{run}a")).await?;
    let peak = full.rate;
    let half = peak / 2.0;
    let paced_n = (s.commands / 2).max(100);
    eprintln!("GenerateKey paced at half the peak ({half:.0}/s): {paced_n} commands…");
    let pace = Duration::from_secs_f64(1.0 / half.max(1.0));
    let paced = commands(&s, &pool, paced_n, Some(pace), &format!("{run}b")).await?;
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| raw database: single-row INSERT+COMMIT, one connection | {db:.0}/s |");
    println!("| raw broker: idempotent produce, 500-byte values | {produce:.0}/s |");
    println!("| raw broker: bare consumer | {consume:.0}/s |");
    println!(
        "| GenerateKey over the bus, produced → listed (peak) | {peak:.0}/s ({:.2}× raw commits) |",
        peak / db
    );
    println!(
        "| latency at peak, p50 / p99 | {:.0} ms / {:.0} ms |",
        percentile(&full.latencies, 0.5),
        percentile(&full.latencies, 0.99)
    );
    println!(
        "| latency at half of peak ({half:.0}/s), p50 / p99 | {:.0} ms / {:.0} ms |",
        percentile(&paced.latencies, 0.5),
        percentile(&paced.latencies, 0.99)
    );
    println!(
        "| projection lag at half of peak (decided → listing row), p50 / p99 | {:.0} ms / {:.0} ms |",
        percentile(&paced.lags, 0.5),
        percentile(&paced.lags, 0.99)
    );
    Ok(())
}

/// `keyledger bench audit`: `audit --from kafka` next to a bare consumer of the same topic.
///
/// Writes `events` synthetic but valid events (KeyGenerated, 20 keys per account, each
/// envelope with its real chain value) to a fresh events topic, then times (1) a bare
/// consumer reading every record and (2) the auditor replaying the topic with every check.
pub async fn audit_bench(brokers: &str, events: usize) -> anyhow::Result<()> {
    use keyledger_events::EventEnvelope;
    let mut bus = BusConfig::new(brokers);
    bus.topic_prefix = format!(
        "bench-audit-{}.",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    bus.ensure_topics().await?;
    let topic = bus.events_topic();
    let producer = bus.producer(20)?;
    let hasher = keyledger::domain::KeyHasher::new(b"bench-audit pepper bench-audit pepper");
    let now = chrono::Utc::now();
    eprintln!("writing {events} events to {topic}…");
    let started = Instant::now();
    let mut chain_head = keyledger_events::chain::GENESIS;
    let signer =
        keyledger::domain::LogSigner::from_base64(&keyledger::domain::LogSigner::generate_seed())?;
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..events {
        let (account, sequence, event) = super::synthetic_key(&hasher, i, now);
        if sequence == 1 {
            chain_head = keyledger_events::chain::GENESIS;
        }
        let previous = chain_head;
        chain_head = keyledger_events::chain::next(&chain_head, &account, sequence, &event);
        let mut envelope = EventEnvelope::of(&account, sequence, &event, &previous, &chain_head);
        envelope.signature = Some(signer.sign(&chain_head));
        let bytes = serde_json::to_vec(&envelope)?;
        // Enqueued here, in order (per account order is what the audit checks).
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&account).payload(&bytes)) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    for d in pending.drain(..) {
                        d.await?.map_err(|(e, _)| e)?;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        if pending.len() >= 50_000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e)?;
    }
    let written = started.elapsed().as_secs_f64();
    eprintln!("written in {written:.1} s; bare consumer…");
    let public_key = signer.public_key();
    let (bare, audited) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, (f64, u64, usize))> {
            let consumer: BaseConsumer = bus.reader(&topic, &[])?;
            let started = Instant::now();
            let mut got = 0usize;
            let mut idle = Instant::now();
            while got < events && idle.elapsed() < Duration::from_secs(60) {
                if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                    m?;
                    got += 1;
                    idle = Instant::now();
                }
            }
            let bare = got as f64 / started.elapsed().as_secs_f64();
            eprintln!("bare consumer: {got} records at {bare:.0}/s; audit --from kafka…");
            let opts = keyledger::audit::AuditOptions {
                account: None,
                until: None,
                validity_months: 6,
                print_listing: false,
                public_key: Some(public_key.into()),
            };
            let started = Instant::now();
            let auditor = keyledger::audit::from_kafka(&bus, opts)?;
            let seconds = started.elapsed().as_secs_f64();
            let (n, findings) = auditor.summary();
            for f in auditor.first_findings(5) {
                eprintln!("finding: {f:?}");
            }
            Ok((bare, (n as f64 / seconds, n, findings)))
        })
        .await??;
    let (audit_rate, n, findings) = audited;
    println!("| measure ({events} events, 20 per account) | value |");
    println!("| --- | --- |");
    println!("| bare consumer (read every record) | {bare:.0} events/s |");
    println!("| audit --from kafka (parse, chain, invariants, secrets, rebuilt listing) | {audit_rate:.0} events/s ({:.2}× bare) |", audit_rate / bare);
    println!("| events audited / findings | {n} / {findings} |");
    Ok(())
}
