//! `keyledger drill load`: the load and the verdict of a fault drill (`drills/`).
//!
//! From a process of its own it sends commands over the bus at a steady rate — GenerateKey
//! in the main, plus a share that must be rejected (bad contacts, unknown keys) and
//! redeliveries of commands already sent — while a drill script breaks something. It
//! resends every command that has no result yet, until each has one, and then checks
//! against PostgreSQL that every accepted command has exactly one effect (one event with its
//! command id), that no rejected one has any, and that the listing caught up. It prints a
//! JSON report and exits non-zero when a promise was broken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use futures::StreamExt;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use keyledger::kafka::BusConfig;

pub struct DrillSettings {
    pub database_url: String,
    pub bus: BusConfig,
    pub commands: usize,
    pub accounts: usize,
    /// Commands per second.
    pub rate: f64,
    /// Give up waiting for results after this long.
    pub deadline: Duration,
    /// Resend a command without a result after this long.
    pub resend_after: Duration,
}

#[derive(Clone)]
struct Sent {
    account: String,
    bytes: Vec<u8>,
    /// What it must end as: `accepted` or `rejected`.
    expect: &'static str,
    at: Instant,
}

fn envelope(i: usize, s: &DrillSettings, reply: &str, run: &str) -> (Uuid, Sent) {
    let id = Uuid::now_v7();
    let account = format!("drill-{run}-{}", i % s.accounts);
    let (command, expect) = match i % 100 {
        // Bad contacts: a typed rejection, no event.
        37 => (
            json!({"type": "GenerateKey", "label": format!("bad-{i}"), "contacts": ["not-an-email"], "login_email": "owner@agency.gov.sg"}),
            "rejected",
        ),
        // An unknown key: rejected.
        73 => (
            json!({"type": "RevokeKey", "key_id": Uuid::new_v4()}),
            "rejected",
        ),
        _ => (
            json!({"type": "GenerateKey", "label": format!("k-{i}"), "contacts": ["ops@agency.gov.sg"], "login_email": "owner@agency.gov.sg"}),
            "accepted",
        ),
    };
    let env = json!({"command_id": id, "account_id": account, "issued_by": "drill", "command": command, "reply_public_key": reply});
    let bytes = serde_json::to_vec(&env).unwrap_or_default();
    (
        id,
        Sent {
            account,
            bytes,
            expect,
            at: Instant::now(),
        },
    )
}

/// Runs the load, waits for every result, checks the store; returns the report and
/// whether every promise held.
pub async fn load(s: DrillSettings) -> anyhow::Result<(Value, bool)> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&s.database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let reply = STANDARD.encode(
        crypto_box::SecretKey::generate(&mut rand::rngs::OsRng)
            .public_key()
            .as_bytes(),
    );
    let producer = keyledger::kafka::publisher::Publisher::new(&s.bus, 2)?;
    let commands_topic = s.bus.commands_topic();
    let results: StreamConsumer = s.bus.reader(&s.bus.results_topic(), &[])?;
    let mut stream = results.stream();

    let started = Instant::now();
    let mut sent: HashMap<Uuid, Sent> = HashMap::with_capacity(s.commands);
    // command id → every status seen
    let mut seen: HashMap<Uuid, Vec<String>> = HashMap::with_capacity(s.commands);
    let mut resent = 0usize;
    let mut send_errors = 0usize;
    let pace = Duration::from_secs_f64(1.0 / s.rate.max(1.0));
    let mut next_send = Instant::now();
    let mut i = 0usize;
    let mut redeliveries = Vec::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let send = |account: String, bytes: Vec<u8>| {
        let (p, t) = (producer.clone(), commands_topic.clone());
        async move { p.send(&t, Some(&account), &bytes).await.map(|_| ()) }
    };
    let mut last_resend_check = Instant::now();
    loop {
        let done_sending = i >= s.commands;
        let complete = done_sending && sent.keys().all(|id| seen.contains_key(id));
        if complete || started.elapsed() > s.deadline {
            break;
        }
        if !done_sending && Instant::now() >= next_send {
            let (id, c) = envelope(i, &s, &reply, &run);
            in_flight.push(send(c.account.clone(), c.bytes.clone()));
            // Every 50th command is delivered twice, as an at-least-once sender would.
            if i % 50 == 25 {
                redeliveries.push(id);
                in_flight.push(send(c.account.clone(), c.bytes.clone()));
            }
            sent.insert(id, c);
            i += 1;
            next_send += pace;
            continue;
        }
        if done_sending && last_resend_check.elapsed() > Duration::from_secs(1) {
            last_resend_check = Instant::now();
            for (id, c) in sent.iter_mut() {
                if !seen.contains_key(id) && c.at.elapsed() > s.resend_after {
                    c.at = Instant::now();
                    resent += 1;
                    in_flight.push(send(c.account.clone(), c.bytes.clone()));
                }
            }
        }
        let wait = if done_sending {
            Duration::from_millis(200)
        } else {
            next_send.saturating_duration_since(Instant::now())
        };
        tokio::select! {
            m = stream.next() => {
                if let Some(Ok(m)) = m {
                    let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null);
                    if let (Some(id), Some(status)) = (v["command_id"].as_str().and_then(|s| s.parse().ok()), v["status"].as_str()) {
                        seen.entry(id).or_default().push(status.to_owned());
                    }
                }
            }
            r = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(Err(e)) = r {
                    send_errors += 1;
                    tracing::warn!(error = %e, "a command could not be produced; it will be resent");
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    // The verdict on the results.
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let mut inconsistent = Vec::new();
    for (id, c) in &sent {
        match seen.get(id) {
            None => missing.push(id.to_string()),
            Some(list) => {
                let first = list.first().map(String::as_str).unwrap_or("");
                let final_status = list
                    .iter()
                    .find(|s| *s != "duplicate")
                    .map(String::as_str)
                    .unwrap_or(first);
                *statuses.entry(final_status.to_owned()).or_default() += 1;
                let ok = final_status == c.expect
                    || (final_status == "duplicate" && c.expect == "accepted");
                if !ok {
                    wrong.push(json!({"command_id": id, "expected": c.expect, "got": list}));
                }
                let distinct: HashSet<_> = list.iter().filter(|s| *s != "duplicate").collect();
                if distinct.len() > 1 {
                    inconsistent.push(json!({"command_id": id, "got": list}));
                }
            }
        }
    }

    // The verdict on the store: exactly one effect per accepted command, none otherwise.
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT metadata->>'command_id', count(*) FROM events \
         WHERE metadata->>'actor' = 'bus:drill' GROUP BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let effects: HashMap<String, i64> = rows.into_iter().collect();
    let mut effect_errors = Vec::new();
    for (id, c) in &sent {
        let n = effects.get(&id.to_string()).copied().unwrap_or(0);
        let want = if c.expect == "accepted" { 1 } else { 0 };
        if n != want {
            effect_errors.push(json!({"command_id": id, "events": n, "expected": want}));
        }
    }
    let accepted = sent.values().filter(|c| c.expect == "accepted").count() as i64;
    // The listing catches up with every accepted key.
    let prefix = format!("drill-{run}-%");
    let listing_started = Instant::now();
    let mut listed = 0i64;
    while listing_started.elapsed() < Duration::from_secs(120) {
        listed = sqlx::query_scalar("SELECT count(*) FROM key_listing WHERE account_id LIKE $1")
            .bind(&prefix)
            .fetch_one(&pool)
            .await?;
        if listed >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pass = missing.is_empty()
        && wrong.is_empty()
        && inconsistent.is_empty()
        && effect_errors.is_empty()
        && listed == accepted;
    let first = |v: &Vec<Value>| v.iter().take(10).cloned().collect::<Vec<_>>();
    let report = json!({
        "pass": pass,
        "run": run,
        "commands": sent.len(),
        "redelivered": redeliveries.len(),
        "resent_without_result": resent,
        "produce_errors": send_errors,
        "seconds": (elapsed * 10.0).round() / 10.0,
        "commands_per_second": ((sent.len() as f64 / elapsed) * 10.0).round() / 10.0,
        "final_statuses": statuses,
        "missing_results": missing.len(),
        "missing_examples": missing.iter().take(10).collect::<Vec<_>>(),
        "wrong_status": wrong.len(),
        "wrong_examples": first(&wrong),
        "inconsistent_answers": inconsistent.len(),
        "effect_errors": effect_errors.len(),
        "effect_examples": first(&effect_errors),
        "accepted_keys": accepted,
        "listed_keys": listed,
        "listing_caught_up_seconds": (listing_started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    Ok((report, pass))
}
