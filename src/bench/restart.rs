//! `keyledger bench restart`: how long keyledger takes from start to ready with a large
//! store, and how much memory its keys take in the running process.
//!
//! On an empty database (which the tool migrates) it starts `keyledger serve` (PostgreSQL,
//! no bus: the index is rebuilt by replaying the event store, the slowest start there is)
//! and times spawn → `/readyz` answering 200; that start's resident set is the baseline.
//! It then writes `keys` synthetic `KeyGenerated` events (20 per account) straight into the
//! event store, starts the service again — the first start replays every event and writes
//! the listing rows — and once more, when only the replay remains. Memory per key is the
//! growth of the resident set over the baseline, divided by the keys.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};

pub struct RestartSettings {
    /// An empty database the tool may fill.
    pub database_url: String,
    pub keys: usize,
    /// The `keyledger` binary to start (this one by default).
    pub binary: PathBuf,
}

/// One start of the service.
pub struct Start {
    pub name: String,
    pub seconds: f64,
    pub rss_bytes: u64,
}

const PEPPER: &str = "bench-restart-pepper-bench-restart-pepper";
const TOKEN: &str = "bench-restart-token-0000000000000000";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Starts the service, waits for `/readyz`, measures, stops it with SIGTERM.
async fn start(s: &RestartSettings, name: &str) -> anyhow::Result<Start> {
    let port = free_port()?;
    let started = Instant::now();
    let mut child: Child = Command::new(&s.binary)
        .arg("serve")
        .env_remove("KEYLEDGER_KAFKA_BROKERS")
        .env_remove("KEYLEDGER_ROLES")
        .env("KEYLEDGER_DATABASE_URL", &s.database_url)
        .env("KEYLEDGER_PEPPER", PEPPER)
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .env("KEYLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", s.binary.display()))?;
    let pid = child.id().context("the service exited at once")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("http://127.0.0.1:{port}/readyz");
    let seconds = loop {
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                break started.elapsed().as_secs_f64();
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("the service exited before it was ready: {status}");
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("not ready after 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Let allocations settle (the replay's pages are freed) before reading the RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_bytes(pid);
    // SIGTERM: a graceful stop, as an operator would restart it.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    eprintln!(
        "{name}: ready after {seconds:.2} s, resident {:.1} MiB",
        rss as f64 / 1048576.0
    );
    Ok(Start {
        name: name.to_owned(),
        seconds,
        rss_bytes: rss,
    })
}

/// Writes `keys` KeyGenerated events (20 per account) into the event store.
async fn seed(database_url: &str, keys: usize) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    let hasher = crate::domain::KeyHasher::new(PEPPER.as_bytes());
    let now = chrono::Utc::now();
    let started = Instant::now();
    const BATCH: usize = 10_000;
    let mut i = 0;
    while i < keys {
        let n = BATCH.min(keys - i);
        let (mut ids, mut seqs, mut payloads) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for j in i..i + n {
            let (account, sequence, event) = super::synthetic_key(&hasher, j, now);
            ids.push(account);
            seqs.push(sequence as i64);
            payloads.push(serde_json::to_string(&event)?);
        }
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT 'Keyring', a, s, 'KeyGenerated', $4, p::json, '{\"issued_by\":\"bench\"}'::json \
             FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS t(a, s, p)",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&payloads)
        .bind(keyledger_events::EVENT_VERSION)
        .execute(&pool)
        .await
        .context("cannot write the synthetic events")?;
        i += n;
        if i % 100_000 == 0 || i == keys {
            eprintln!("seeded {i} events");
        }
    }
    // As if a relay had published them long ago: no bus runs here.
    sqlx::query("TRUNCATE outbox").execute(&pool).await.ok();
    sqlx::query("VACUUM ANALYZE events")
        .execute(&pool)
        .await
        .ok();
    eprintln!(
        "{keys} events written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs the three starts and prints a Markdown table.
pub async fn run(s: RestartSettings) -> anyhow::Result<Vec<Start>> {
    let empty = start(&s, "empty store (migrations, nothing to replay)").await?;
    seed(&s.database_url, s.keys).await?;
    let first = start(
        &s,
        "first start: replay every event and write every listing row",
    )
    .await?;
    let again = start(&s, "restart: replay every event (listing current)").await?;
    let per_key =
        |st: &Start| st.rss_bytes.saturating_sub(empty.rss_bytes) as f64 / s.keys.max(1) as f64;
    println!(
        "| start of `keyledger serve` (PostgreSQL, {} keys) | to ready | resident | growth per key |",
        s.keys
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| {} | {:.2} s | {:.0} MiB | — |",
        empty.name,
        empty.seconds,
        empty.rss_bytes as f64 / 1048576.0
    );
    for st in [&first, &again] {
        println!(
            "| {} | {:.2} s | {:.0} MiB | {:.0} bytes |",
            st.name,
            st.seconds,
            st.rss_bytes as f64 / 1048576.0,
            per_key(st)
        );
    }
    Ok(vec![empty, first, again])
}
