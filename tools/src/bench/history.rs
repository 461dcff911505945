//! `keyledger-tools bench history` and `bench revocation`: what the log offers, timed.
//!
//! - `history`: one account of `--events` events (keys generated, then their contacts
//!   changed over and over) on a running keyledger; then the listing `as_of` an instant in
//!   the middle of that history, with `include=inactive`, and one key's history, each next
//!   to the plain listing (a read of the listing table) in the same run.
//! - `revocation`: two running instances on one store and one bus. A key is revoked on A;
//!   from A's answer, B is asked to verify it in a tight loop until it refuses: that time
//!   is how long a revoked key may still pass elsewhere. Once idle, once while A takes
//!   GenerateKey at half of the peak rate measured just before in the same run.
//!
//! Keys live in memory only and are never printed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::{Client, Method};
use serde_json::{json, Value};

use super::percentile;

/// A caller of one keyledger.
#[derive(Clone)]
struct Api {
    http: Client,
    url: String,
    token: String,
}

impl Api {
    fn new(url: &str, token: &str) -> Self {
        Self {
            http: Client::new(),
            url: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.context("request")?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Generates a key; (key id, api key).
    async fn generate(&self, account: &str, label: &str) -> anyhow::Result<(String, String)> {
        let body = super::generate_body(label);
        let v = self
            .call(
                Method::POST,
                &format!("/v1/accounts/{account}/keys"),
                Some(body),
            )
            .await?;
        Ok((
            v["key_id"].as_str().unwrap_or_default().to_owned(),
            v["api_key"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    async fn valid(&self, api_key: &str) -> anyhow::Result<bool> {
        let v = self
            .call(
                Method::POST,
                "/v1/verify",
                Some(json!({"api_key": api_key})),
            )
            .await?;
        Ok(v["valid"] == json!(true))
    }
}

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// (p50, p99) in milliseconds of `n` sequential calls of `path`.
async fn time_gets(api: &Api, path: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        api.call(Method::GET, path, None).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}

/// `bench history`.
pub async fn history(url: &str, token: &str, events: usize, samples: usize) -> anyhow::Result<()> {
    let api = Api::new(url, token);
    let account = format!("bench-history-{}", run_id());
    let keys = 10.min(events.max(1));
    let mut ids = Vec::new();
    for k in 0..keys {
        ids.push(api.generate(&account, &format!("k{k}")).await?.0);
    }
    let mut middle = None;
    for e in keys..events {
        if e == events / 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            middle = Some(chrono::Utc::now());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let key = &ids[e % keys];
        let body = json!({"contacts": [format!("ops{e}@agency.gov.sg")]});
        api.call(
            Method::PUT,
            &format!("/v1/accounts/{account}/keys/{key}/contacts"),
            Some(body),
        )
        .await?;
    }
    let middle = middle
        .unwrap_or_else(chrono::Utc::now)
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let keys_path = format!("/v1/accounts/{account}/keys");
    let enc = |s: &str| s.replace(':', "%3A").replace('+', "%2B");
    let cases = [
        ("listing (the table; baseline)", keys_path.clone()),
        (
            "`as_of` the middle of the history",
            format!("{keys_path}?as_of={}", enc(&middle)),
        ),
        (
            "`include=inactive`",
            format!("{keys_path}?include=inactive"),
        ),
        (
            "one key's `history`",
            format!("{keys_path}/{}/history", ids[0]),
        ),
    ];
    println!("One account of {events} events ({keys} keys, then contact changes); {samples} sequential requests each, over HTTP on 127.0.0.1.");
    println!();
    println!("| request | p50 ms | p99 ms | p50 vs listing |");
    println!("| --- | --- | --- | --- |");
    let mut base = f64::NAN;
    for (i, (name, path)) in cases.iter().enumerate() {
        // A few untimed calls first: connections and caches warm.
        time_gets(&api, path, 5).await?;
        let (p50, p99) = time_gets(&api, path, samples).await?;
        if i == 0 {
            base = p50;
        }
        println!("| {name} | {p50:.2} | {p99:.2} | {:.1}× |", p50 / base);
    }
    Ok(())
}

/// Keys generated on `a` (20 per account), once `b` verifies each of them.
async fn keys_known_to_both(
    a: &Api,
    b: &Api,
    n: usize,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let run = run_id();
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let account = format!("bench-revoke-{run}-{}", i / 20);
        let (id, key) = a.generate(&account, &format!("k{i}")).await?;
        keys.push((account, id, key));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (_, _, key) in &keys {
        while !b.valid(key).await? {
            if Instant::now() > deadline {
                bail!("instance B never learned the keys generated on A");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(keys)
}

/// Milliseconds from A's answer to a revocation until B refuses the key, per key.
async fn propagation(
    a: &Api,
    b: &Api,
    keys: &[(String, String, String)],
) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(keys.len());
    for (account, id, key) in keys {
        a.call(
            Method::DELETE,
            &format!("/v1/accounts/{account}/keys/{id}"),
            None,
        )
        .await?;
        let answered = Instant::now();
        loop {
            if !b.valid(key).await? {
                break;
            }
            if answered.elapsed() > Duration::from_secs(30) {
                bail!("B still accepted a key revoked 30 s ago on A");
            }
        }
        ms.push(answered.elapsed().as_secs_f64() * 1e3);
        // Keys apart: each revocation is measured on its own.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// GenerateKey on `a`, closed loop with 16 callers for `seconds`: the peak rate.
async fn peak_generate_rate(a: &Api, seconds: u64) -> anyhow::Result<f64> {
    let run = run_id();
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (a, done, run) = (a.clone(), done.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < until {
                // 40 keys per account: far from the cap of 50.
                let account = format!("bench-peak-{run}-{w}-{}", i / 40);
                a.generate(&account, &format!("k{i}")).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / seconds as f64)
}

/// GenerateKey on `a` at `rate` per second (open loop) until `stop`; returns the count.
fn background_load(a: Api, rate: f64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let run = run_id();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let sent = Arc::new(AtomicU64::new(0));
        let mut requests = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let (a, sent) = (a.clone(), sent.clone());
            let account = format!("bench-load-{run}-{}", i / 40);
            requests.push(tokio::spawn(async move {
                if a.generate(&account, &format!("k{i}")).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
            i += 1;
        }
        // Those still in flight count too.
        for r in requests {
            let _ = r.await;
        }
        sent.load(Ordering::Relaxed)
    })
}

fn row(name: &str, ms: &[f64]) {
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        ms.len(),
        percentile(ms, 0.5),
        percentile(ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

/// `bench revocation`.
pub async fn revocation(
    a_url: &str,
    b_url: &str,
    token: &str,
    trials: usize,
) -> anyhow::Result<()> {
    let (a, b) = (Api::new(a_url, token), Api::new(b_url, token));
    let idle_keys = keys_known_to_both(&a, &b, trials).await?;
    let loaded_keys = keys_known_to_both(&a, &b, trials).await?;
    let idle = propagation(&a, &b, &idle_keys).await?;
    let peak = peak_generate_rate(&a, 5).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = background_load(a.clone(), peak / 2.0, stop.clone());
    // Let the load settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = propagation(&a, &b, &loaded_keys).await?;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap_or(0);
    let achieved = sent as f64 / started.elapsed().as_secs_f64();
    println!("Two instances on one PostgreSQL and one broker: A (every role) revokes; B (`http` only: its index follows the events topic) is asked to verify the key in a closed loop from the moment A answers until it refuses. Latency = A's answer → B's first refusal (the loop's own step, one verify over HTTP, is its resolution).");
    println!();
    println!("| case | revocations | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- |");
    row("idle", &idle);
    row(
        &format!("under GenerateKey at {:.0}/s on A (half of the {peak:.0}/s peak measured just before; achieved {achieved:.0}/s)", peak / 2.0),
        &loaded,
    );
    Ok(())
}
