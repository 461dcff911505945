//! `keyledger bench http`: verification over HTTP, next to a bare endpoint of the same
//! server.
//!
//! A closed-loop load generator (no wrk on this machine, so it lives here): `connections`
//! tasks each send one request, wait for the answer, send the next, for `seconds` after a
//! one-second warm-up. It first drives `GET /livez` (a handler that does nothing: the
//! ceiling of this server, this client and this machine), then `POST /v1/verify` with keys it
//! generated itself, cycling through them, then verify again with a `from` address. The
//! ratio verify / bare is the figure to read: what verification costs on top of HTTP.
//!
//! The generated keys live in this process's memory only and are never printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::percentile;

pub struct HttpSettings {
    /// The running keyledger, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub token: String,
    /// Keys to generate and verify (spread over accounts of 20 keys).
    pub keys: usize,
    pub connections: usize,
    pub seconds: u64,
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
    Verify { from: bool },
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
            let body = json!({"label": format!("k{i}"), "contacts": ["ops@agency.gov.sg"], "login_email": "bench@agency.gov.sg"});
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
                    Target::Bare => client.get(&bare).send().await?,
                    Target::Verify { from } => {
                        let key = &keys[i % keys.len()];
                        i += 7;
                        let body = if *from {
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
        (
            Target::Verify { from: false },
            "POST /v1/verify (valid key)",
        ),
        (
            Target::Verify { from: true },
            "POST /v1/verify (valid key + from address)",
        ),
    ] {
        eprintln!("{name}: {} connections for {} s…", s.connections, s.seconds);
        phases.push(drive(&client, &s, &keys, target, name).await?);
    }
    let bare = phases[0].rate;
    println!(
        "| HTTP, {} connections, {} s each, {} keys | requests/s | × bare | p50 | p99 |",
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
    let total: usize = phases.iter().map(|p| p.requests).sum();
    eprintln!("{total} requests measured");
    Ok(phases)
}
