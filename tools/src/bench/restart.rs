//! `keyledger-tools bench restart`: how long keyledger takes from start to ready with a
//! large store, in every mode, and how much memory its keys take in the running process.
//!
//! For each mode — PostgreSQL without the bus, PostgreSQL with the bus (when brokers are
//! given), embedded SQLite — it starts `keyledger serve` on an empty store (the baseline),
//! writes `keys` synthetic `KeyGenerated` events (20 per account) straight into the event
//! store, starts it again (a first start on an imported history: every listing row to
//! write, the whole log to replay into the index) and once more (a restart: the index from
//! its snapshot, the listing current). Each start is timed from spawn to `/readyz`
//! answering 200 and stopped with SIGTERM (which also writes the index snapshot). Memory
//! per key is the resident set's growth over the baseline, divided by the keys.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keyledger::store::Store;
use sqlx::postgres::PgPoolOptions;
use tokio::process::{Child, Command};

pub struct RestartSettings {
    /// An empty PostgreSQL database the tool may fill.
    pub database_url: String,
    /// Brokers for the mode with the bus.
    pub kafka_brokers: Option<String>,
    pub keys: usize,
    /// The `keyledger` binary to start.
    pub binary: PathBuf,
    /// Which modes to measure: `postgres`, `bus`, `embedded` (all when empty).
    pub modes: Vec<String>,
}

/// One start of the service.
pub struct Start {
    pub mode: &'static str,
    pub name: &'static str,
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

/// How a mode is started.
enum Mode<'a> {
    Postgres(&'a str),
    Bus(&'a str, &'a str, &'a str),
    Embedded(&'a Path),
}

/// Starts the service, waits for `/readyz`, measures, stops it with SIGTERM.
async fn start(
    s: &RestartSettings,
    mode: &Mode<'_>,
    label: &'static str,
    name: &'static str,
) -> anyhow::Result<Start> {
    let port = free_port()?;
    let mut command = Command::new(&s.binary);
    command
        .arg("serve")
        .env_remove("KEYLEDGER_KAFKA_BROKERS")
        .env_remove("KEYLEDGER_ROLES")
        .env_remove("KEYLEDGER_DATABASE_URL")
        .env("KEYLEDGER_PEPPER", PEPPER)
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .env(
            "KEYLEDGER_SIGNING_KEY",
            "YmVuY2gtcmVzdGFydC1zaWduaW5nLWtleS0wMDAwMDA=",
        )
        .env("KEYLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_SERVICE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    match mode {
        Mode::Postgres(url) => {
            command.env("KEYLEDGER_DATABASE_URL", url);
        }
        Mode::Bus(url, brokers, prefix) => {
            command
                .env("KEYLEDGER_DATABASE_URL", url)
                .env("KEYLEDGER_KAFKA_BROKERS", brokers)
                .env("KEYLEDGER_TOPIC_PREFIX", prefix);
        }
        Mode::Embedded(dir) => {
            command.env("KEYLEDGER_DATA_DIR", dir);
        }
    }
    let started = Instant::now();
    let mut child: Child = command
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
    // SIGTERM: a graceful stop, as an operator would restart it (the index snapshot is
    // written on the way out).
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .is_err()
    {
        child.kill().await?;
    }
    eprintln!(
        "{label}, {name}: ready after {seconds:.2} s, resident {:.1} MiB",
        rss as f64 / 1048576.0
    );
    Ok(Start {
        mode: label,
        name,
        seconds,
        rss_bytes: rss,
    })
}

/// Writes `keys` KeyGenerated events (20 per account) into a migrated event store, past the
/// aggregate, as an import of an existing history would.
async fn seed(store: &Store, keys: usize) -> anyhow::Result<()> {
    let hasher = keyledger::domain::KeyHasher::new(PEPPER.as_bytes());
    let now = chrono::Utc::now();
    let started = Instant::now();
    const BATCH: usize = 10_000;
    let mut i = 0;
    while i < keys {
        let n = BATCH.min(keys - i);
        let mut rows = Vec::with_capacity(n);
        for j in i..i + n {
            let (account, sequence, event) = super::synthetic_key(&hasher, j, now);
            rows.push((account, sequence as i64, serde_json::to_string(&event)?));
        }
        match store.pg_pool() {
            Some(pool) => {
                let (ids, seqs, payloads): (Vec<_>, Vec<_>, Vec<_>) = rows.into_iter().fold(
                    (Vec::new(), Vec::new(), Vec::new()),
                    |(mut a, mut s, mut p), (x, y, z)| {
                        a.push(x);
                        s.push(y);
                        p.push(z);
                        (a, s, p)
                    },
                );
                sqlx::query(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                     SELECT 'Keyring', a, s, 'KeyGenerated', $4, p::json, '{\"issued_by\":\"bench\"}'::json \
                     FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS t(a, s, p)",
                )
                .bind(&ids)
                .bind(&seqs)
                .bind(&payloads)
                .bind(keyledger_events::EVENT_VERSION)
                .execute(pool)
                .await
                .context("cannot write the synthetic events")?;
            }
            None => {
                let mut tx = store.begin().await?;
                let keyledger::store::Tx::Lite(t) = &mut tx else {
                    bail!("expected SQLite");
                };
                for chunk in rows.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ",
                    );
                    q.push_values(chunk, |mut b, (account, sequence, payload)| {
                        b.push("'Keyring'")
                            .push_bind(account.clone())
                            .push_bind(*sequence)
                            .push("'KeyGenerated'")
                            .push_bind(keyledger_events::EVENT_VERSION)
                            .push_bind(payload.clone())
                            .push("'{\"issued_by\":\"bench\"}'");
                    });
                    q.build().execute(&mut **t).await?;
                }
                tx.commit().await?;
            }
        }
        i += n;
        if i % 200_000 == 0 || i == keys {
            eprintln!("seeded {i} events");
        }
    }
    if let Some(pool) = store.pg_pool() {
        // As if a relay had published them long ago: the outbox would be empty.
        sqlx::query("TRUNCATE outbox").execute(pool).await.ok();
        sqlx::query("VACUUM ANALYZE events")
            .execute(pool)
            .await
            .ok();
    }
    eprintln!(
        "{keys} events written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The three starts of one mode.
async fn mode(
    s: &RestartSettings,
    mode: Mode<'_>,
    label: &'static str,
    store: &Store,
) -> anyhow::Result<Vec<Start>> {
    let empty = start(s, &mode, label, "empty store").await?;
    seed(store, s.keys).await?;
    let first = start(s, &mode, label, "first start on the imported history").await?;
    let again = start(s, &mode, label, "restart").await?;
    Ok(vec![empty, first, again])
}

/// Runs every mode and prints a Markdown table.
pub async fn run(s: RestartSettings) -> anyhow::Result<Vec<Start>> {
    let mut starts = Vec::new();
    // PostgreSQL: one database per mode (the given one, and one more for the bus).
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&s.database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    let wanted = |m: &str| s.modes.is_empty() || s.modes.iter().any(|x| x == m);
    let store = Store::from_postgres(admin.clone());
    store.migrate().await?;
    if wanted("postgres") {
        starts.extend(mode(&s, Mode::Postgres(&s.database_url), "PostgreSQL", &store).await?);
    }
    if let Some(brokers) = s.kafka_brokers.as_ref().filter(|_| wanted("bus")) {
        let name = format!("kl_bench_restart_bus_{}", std::process::id());
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        let url = match s.database_url.rfind('/') {
            Some(i) => format!("{}/{name}", &s.database_url[..i]),
            None => bail!("cannot tell the database in {}", "KEYLEDGER_DATABASE_URL"),
        };
        let bus_store = Store::connect_postgres(&url, 2).await?;
        bus_store.migrate().await?;
        let prefix = format!("bench-restart-{}.", uuid::Uuid::new_v4().simple());
        starts.extend(
            mode(
                &s,
                Mode::Bus(&url, brokers, &prefix),
                "PostgreSQL + bus",
                &bus_store,
            )
            .await?,
        );
        drop(bus_store);
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await
            .ok();
    }
    if wanted("embedded") {
        let dir =
            std::env::temp_dir().join(format!("keyledger-bench-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let embedded = Store::open_sqlite(&dir.join("keyledger.db")).await?;
        embedded.migrate().await?;
        starts.extend(mode(&s, Mode::Embedded(&dir), "embedded (SQLite)", &embedded).await?);
        drop(embedded);
        let _ = std::fs::remove_dir_all(&dir);
    }

    println!(
        "| start of `keyledger serve` with {} keys | to ready | resident | growth per key |",
        s.keys
    );
    println!("| --- | --- | --- | --- |");
    for chunk in starts.chunks(3) {
        let empty = &chunk[0];
        for st in chunk {
            let per_key = if std::ptr::eq(st, empty) {
                "—".to_owned()
            } else {
                format!(
                    "{:.0} bytes",
                    st.rss_bytes.saturating_sub(empty.rss_bytes) as f64 / s.keys.max(1) as f64
                )
            };
            println!(
                "| {}: {} | {:.2} s | {:.0} MiB | {per_key} |",
                st.mode,
                st.name,
                st.seconds,
                st.rss_bytes as f64 / 1048576.0
            );
        }
    }
    Ok(starts)
}
