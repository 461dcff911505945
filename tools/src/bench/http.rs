//! `keyledger-tools bench http`: verification over HTTP, next to a bare endpoint of the
//! same server.
//!
//! It generates keys through the API, then drives `GET /livez` (a handler that does
//! nothing: the ceiling of this server, this client and this machine), `POST /v1/verify`
//! with one key (a busy sender), with the generated keys in turn, and with a `from`
//! address. The ratio verify / bare is the figure to read: what verification costs on top
//! of HTTP. The load comes from `wrk` (`--generator wrk`: an external generator, so this
//! tool's own cost cannot hide a gap; the keys reach it in its environment, never on disk)
//! or from a closed-loop generator in this process (`--generator builtin`).
//!
//! With `--legacy-flood` (wrk only) a last phase verifies the valid keys in turn again while
//! a second wrk floods the server with made-up keys shaped like a migrated legacy key's
//! username — the attack the legacy gate (`src/read_side/legacy.rs`) exists for. The server
//! must run with `KEYLEDGER_LEGACY_SALT` set (a real bcrypt salt) and a legacy cut-off in
//! the future (`KEYLEDGER_LEGACY_EXPIRY`), or the flood never reaches the slow path.
//!
//! The generated keys live in memory only and are never printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::percentile;

/// Where the load comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generator {
    /// `wrk` (Debian package), 2 threads.
    Wrk,
    /// A closed-loop generator in this process.
    Builtin,
}

pub struct HttpSettings {
    /// The running keyledger, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub generator: Generator,
    pub token: String,
    /// Keys to generate and verify (spread over accounts of 20 keys).
    pub keys: usize,
    pub connections: usize,
    pub seconds: u64,
    /// Add the phase under a flood of legacy-shaped unknown keys.
    pub legacy_flood: bool,
}

impl HttpSettings {
    /// wrk on `server`'s valid keys, no legacy flood; counts of at least one.
    pub fn new(server: &str, token: String, keys: usize, connections: usize, seconds: u64) -> Self {
        Self {
            url: server.trim_end_matches('/').to_owned(),
            generator: Generator::Wrk,
            token,
            keys: keys.max(1),
            connections: connections.max(1),
            seconds: seconds.max(1),
            legacy_flood: false,
        }
    }
}

/// One measured phase.
pub struct Phase {
    pub name: &'static str,
    pub requests: usize,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

enum Target {
    Bare,
    /// The same key every time.
    One,
    Verify {
        from: bool,
    },
    /// A new made-up key of this username on every request.
    Flood {
        user: String,
    },
}

async fn generate_keys(client: &reqwest::Client, s: &HttpSettings) -> anyhow::Result<Vec<String>> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut keys = Vec::with_capacity(s.keys);
    // A few at a time: the command path is not what is measured here.
    let mut batch = Vec::new();
    for i in 0..s.keys {
        let (client, url, token) = (
            client.clone(),
            format!("{}/v1/accounts/bench-http-{run}-{}/keys", s.url, i / 20),
            s.token.clone(),
        );
        batch.push(tokio::spawn(async move {
            let body = super::generate_body(&format!("k{i}"));
            let answer: Value = client
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            anyhow::Ok(answer["api_key"].as_str().unwrap_or_default().to_owned())
        }));
        if batch.len() == 16 || i + 1 == s.keys {
            for t in batch.drain(..) {
                let key = t.await?.context("cannot generate a key")?;
                if key.is_empty() {
                    bail!("a GenerateKey answer carried no key");
                }
                keys.push(key);
            }
        }
    }
    Ok(keys)
}

async fn drive(
    client: &reqwest::Client,
    s: &HttpSettings,
    keys: &Arc<Vec<String>>,
    target: Target,
    name: &'static str,
) -> anyhow::Result<Phase> {
    let target = Arc::new(target);
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + Duration::from_secs(s.seconds);
    let mut tasks = Vec::new();
    for c in 0..s.connections {
        let (client, keys, target) = (client.clone(), keys.clone(), target.clone());
        let (bare, verify, token) = (
            format!("{}/livez", s.url),
            format!("{}/v1/verify", s.url),
            s.token.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut i = c;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let response = match &*target {
                    Target::Bare | Target::Flood { .. } => client.get(&bare).send().await?,
                    Target::One | Target::Verify { .. } => {
                        let from = matches!(&*target, Target::Verify { from: true });
                        let key = if matches!(&*target, Target::One) {
                            &keys[0]
                        } else {
                            &keys[i % keys.len()]
                        };
                        i += 7;
                        let body = if from {
                            json!({"api_key": key, "from": "bench@agency.gov.sg"})
                        } else {
                            json!({"api_key": key})
                        };
                        client
                            .post(&verify)
                            .bearer_auth(&token)
                            .json(&body)
                            .send()
                            .await?
                    }
                };
                let status = response.status();
                let body = response.bytes().await?;
                if !status.is_success() {
                    bail!("{status}: {}", String::from_utf8_lossy(&body));
                }
                if started >= warm_until {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_by(f64::total_cmp);
    Ok(Phase {
        name,
        requests: all.len(),
        rate: all.len() as f64 / s.seconds as f64,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    })
}

/// Runs the three phases and prints a Markdown table.
pub async fn run(s: HttpSettings) -> anyhow::Result<Vec<Phase>> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(s.connections)
        .timeout(Duration::from_secs(30))
        .build()?;
    eprintln!("generating {} keys through the API…", s.keys);
    let keys = Arc::new(generate_keys(&client, &s).await?);
    let mut phases = Vec::new();
    for (target, name) in [
        (Target::Bare, "GET /livez (bare endpoint)"),
        (Target::One, "POST /v1/verify (one valid key)"),
        (
            Target::Verify { from: false },
            "POST /v1/verify (valid keys in turn)",
        ),
        (
            Target::Verify { from: true },
            "POST /v1/verify (valid keys + from address)",
        ),
    ] {
        eprintln!("{name}: {} connections for {} s…", s.connections, s.seconds);
        phases.push(match s.generator {
            Generator::Builtin => drive(&client, &s, &keys, target, name).await?,
            Generator::Wrk => wrk(&s, &keys, target, name).await?,
        });
    }
    let flood = match (s.legacy_flood, s.generator) {
        (false, _) => None,
        (true, Generator::Builtin) => bail!("--legacy-flood needs --generator wrk"),
        (true, Generator::Wrk) => Some(under_flood(&client, &s, &keys).await?),
    };
    if let Some(f) = &flood {
        phases.push(Phase {
            name: "POST /v1/verify (valid keys in turn, under a legacy flood)",
            ..f.valid
        });
    }
    let bare = phases[0].rate;
    println!(
        "| HTTP ({}), {} connections, {} s each, {} keys | requests/s | × bare | p50 | p99 |",
        match s.generator {
            Generator::Wrk => "wrk, 2 threads",
            Generator::Builtin => "built-in closed loop",
        },
        s.connections,
        s.seconds,
        keys.len()
    );
    println!("| --- | --- | --- | --- | --- |");
    for p in &phases {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} ms | {:.2} ms |",
            p.name,
            p.rate,
            p.rate / bare,
            p.p50_ms,
            p.p99_ms
        );
    }
    if let Some(f) = &flood {
        let alone = (f.alone.0 + f.alone.1) / 2.0;
        println!();
        println!(
            "Under the flood: valid keys in turn at {:.2}× their rate alone (the mean of {:.0}/s just before and {:.0}/s just after); the flood (wrk, 1 thread, 64 connections, \
             a new made-up key of a username with a live legacy key each time) got {:.0} answers/s, \
             p50 {:.0} ms (the padding that hides whether a bcrypt ran); bcrypt ran {} times in {} s.",
            f.valid.rate / alone,
            f.alone.0,
            f.alone.1,
            f.flood.rate,
            f.flood.p50_ms,
            f.bcrypt_runs,
            s.seconds
        );
    }
    let total: usize = phases.iter().map(|p| p.requests).sum();
    eprintln!("{total} requests measured");
    Ok(phases)
}

/// The verify script wrk runs (`scripts/wrk/verify.lua`).
const WRK_SCRIPT: &str = include_str!("../../../scripts/wrk/verify.lua");
/// The flood of made-up legacy-shaped keys (`scripts/wrk/flood.lua`).
const FLOOD_SCRIPT: &str = include_str!("../../../scripts/wrk/flood.lua");

/// The valid-keys phase and the flood that ran beside it.
struct Flooded {
    valid: Phase,
    flood: Phase,
    bcrypt_runs: u64,
    /// The valid keys in turn alone, just before and just after the flood: the ratio is
    /// taken against their mean, so a drift of the machine between phases cancels out.
    alone: (f64, f64),
}

/// Migrates a legacy key (so its username has a live candidate), then verifies the valid
/// keys in turn while a second wrk sends a new made-up key of that username each time.
async fn under_flood(
    client: &reqwest::Client,
    s: &HttpSettings,
    keys: &[String],
) -> anyhow::Result<Flooded> {
    let user = format!("legacy{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // A real bcrypt hash tail (every flood key misses it anyway), so each check the gate
    // lets through costs a real bcrypt under the server's salt.
    let body = json!({
        "login_email": format!("{user}@agency.gov.sg"),
        "legacy_hash": format!("{user}_v1_{}", "IjZAgcfl7p92ldGxad68LJZdL17lhWy"),
    });
    client
        .post(format!("{}/v1/accounts/bench-{user}/legacy-key", s.url))
        .bearer_auth(&s.token)
        .json(&body)
        .send()
        .await?
        .error_for_status()
        .context("cannot migrate the legacy key the flood aims at")?;
    let alone_before = wrk(s, keys, Target::Verify { from: false }, "alone before").await?;
    let before = bcrypt_runs(client, s).await?;
    let flood_seconds = Settings {
        seconds: s.seconds + 2,
        connections: 64,
        threads: 1,
    };
    let flood_target = Target::Flood { user };
    let flood = wrk_run(s, &flood_seconds, keys, &flood_target, "flood");
    let valid = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        wrk(s, keys, Target::Verify { from: false }, "under flood").await
    };
    let (flood, valid) = tokio::join!(flood, valid);
    let (flood, valid) = (flood?, valid?);
    let after = bcrypt_runs(client, s).await?;
    // Let the last padded answers drain before measuring alone again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alone_after = wrk(s, keys, Target::Verify { from: false }, "alone after").await?;
    Ok(Flooded {
        valid,
        flood,
        bcrypt_runs: after.saturating_sub(before),
        alone: (alone_before.rate, alone_after.rate),
    })
}

/// How many bcrypt checks the server ran so far (`keyledger_legacy_checks_total` with
/// outcome `matched` or `missed`).
async fn bcrypt_runs(client: &reqwest::Client, s: &HttpSettings) -> anyhow::Result<u64> {
    let text = client
        .get(format!("{}/metrics", s.url))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("keyledger_legacy_checks_total")
                && (l.contains("\"matched\"") || l.contains("\"missed\""))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// How one wrk runs.
struct Settings {
    seconds: u64,
    connections: usize,
    threads: usize,
}

/// One phase under wrk: its requests per second and latency percentiles, read from wrk's
/// report.
async fn wrk(
    s: &HttpSettings,
    keys: &[String],
    target: Target,
    name: &'static str,
) -> anyhow::Result<Phase> {
    let run = Settings {
        seconds: s.seconds,
        connections: s.connections,
        threads: 2,
    };
    wrk_run(s, &run, keys, &target, name).await
}

async fn wrk_run(
    s: &HttpSettings,
    run: &Settings,
    keys: &[String],
    target: &Target,
    name: &'static str,
) -> anyhow::Result<Phase> {
    let script = std::env::temp_dir().join(format!(
        "keyledger-wrk-{}-{}.lua",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let source = match target {
        Target::Flood { .. } => FLOOD_SCRIPT,
        _ => WRK_SCRIPT,
    };
    std::fs::write(&script, source)?;
    let mut cmd = tokio::process::Command::new("wrk");
    cmd.args([
        format!("-t{}", run.threads),
        format!("-c{}", run.connections),
    ])
    .arg(format!("-d{}s", run.seconds))
    .arg("--latency")
    .env("WRK_TOKEN", &s.token)
    .kill_on_drop(true);
    match target {
        Target::Bare => {
            cmd.arg(format!("{}/livez", s.url));
        }
        Target::One => {
            cmd.env("WRK_KEYS", &keys[0]);
        }
        Target::Verify { from } => {
            cmd.env("WRK_KEYS", keys.join("\n"));
            if *from {
                cmd.env("WRK_FROM", "bench@agency.gov.sg");
            }
        }
        Target::Flood { user } => {
            cmd.env("WRK_FLOOD_USER", user);
        }
    }
    if !matches!(target, Target::Bare) {
        cmd.arg("-s").arg(&script).arg(&s.url);
    }
    let out = cmd
        .output()
        .await
        .context("cannot run wrk (Debian: apt-get install wrk)")?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") {
        bail!(
            "wrk failed or got errors:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let number = |prefix: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(prefix))?;
        line.split_whitespace()
            .nth(1)
            .map(str::to_owned)
            .and_then(|v| parse_wrk_value(&v))
    };
    let rate = number("Requests/sec:").context("no Requests/sec in wrk's report")?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Phase {
        name,
        requests,
        rate,
        p50_ms: number("50%").unwrap_or(f64::NAN),
        p99_ms: number("99%").unwrap_or(f64::NAN),
    })
}

/// A wrk figure: `81234.56`, or a latency such as `612.00us`, `1.23ms`, `2.00s` (in ms).
fn parse_wrk_value(v: &str) -> Option<f64> {
    for (suffix, factor) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0)] {
        if let Some(n) = v.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|x| x * factor);
        }
    }
    v.parse().ok()
}

/// Verification over HTTP with usage counted next to the same without: `s.url` counts
/// usage, `without` is an instance alike but for `KEYLEDGER_USAGE_FLUSH_SECONDS=0`. The
/// keys are generated on the first (the second learns them from the log); then wrk
/// measures the valid keys in turn on each, alternately (on-off, off-on, …), `rounds`
/// times, so a drift of the machine falls on both. Prints the medians and their ratio.
pub async fn usage(s: HttpSettings, without: String, rounds: usize) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    eprintln!("generating {} keys through the API…", s.keys);
    let keys = generate_keys(&client, &s).await?;
    let last = keys.last().context("no keys")?.clone();
    let without = without.trim_end_matches('/').to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer: Value = client
            .post(format!("{without}/v1/verify"))
            .bearer_auth(&s.token)
            .json(&serde_json::json!({ "api_key": last }))
            .send()
            .await?
            .json()
            .await?;
        if answer["valid"] == Value::Bool(true) {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("{without} does not know the keys after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let off = HttpSettings::new(&without, s.token.clone(), s.keys, s.connections, s.seconds);
    let (mut on_rates, mut off_rates) = (Vec::new(), Vec::new());
    let (mut on_p99, mut off_p99) = (Vec::new(), Vec::new());
    for round in 1..=rounds.max(1) {
        // on-off, then off-on, …: neither side always runs first.
        let on_first = round % 2 == 1;
        for turn in 0..2 {
            let on = (turn == 0) == on_first;
            let (settings, name) = if on {
                (&s, "usage on")
            } else {
                (&off, "usage off")
            };
            eprintln!(
                "round {round}: {name}, {} connections for {} s…",
                s.connections, s.seconds
            );
            let p = wrk(settings, &keys, Target::Verify { from: false }, name).await?;
            let (rates, p99) = if on {
                (&mut on_rates, &mut on_p99)
            } else {
                (&mut off_rates, &mut off_p99)
            };
            rates.push(p.rate);
            p99.push(p.p99_ms);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let ratio = median(&on_rates) / median(&off_rates);
    let pairs: Vec<f64> = on_rates
        .iter()
        .zip(&off_rates)
        .map(|(a, b)| a / b)
        .collect();
    println!(
        "| POST /v1/verify, {} keys in turn, wrk {} connections, {} s × {} rounds each | median requests/s | p99 (median) | per round |",
        keys.len(),
        s.connections,
        s.seconds,
        on_rates.len()
    );
    println!("| --- | --- | --- | --- |");
    let rounds_text = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| usage counted (flushed every 5 s) | {:.0} | {:.2} ms | {} |",
        median(&on_rates),
        median(&on_p99),
        rounds_text(&on_rates)
    );
    println!(
        "| usage off (`KEYLEDGER_USAGE_FLUSH_SECONDS=0`) | {:.0} | {:.2} ms | {} |",
        median(&off_rates),
        median(&off_p99),
        rounds_text(&off_rates)
    );
    println!();
    println!(
        "With usage counted: **{ratio:.2}×** the rate without (target ≥ 0.95×); round by round {} (median {:.2}×).",
        pairs
            .iter()
            .map(|r| format!("{r:.2}×"))
            .collect::<Vec<_>>()
            .join(", "),
        median(&pairs)
    );
    Ok(ratio)
}
