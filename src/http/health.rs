//! `/readyz` (may this instance take traffic?), `/metrics` (Prometheus) and `/v1/log-key`
//! (the log's public key). All are open, like `/healthz`: probes, scrapers and auditors
//! carry no token, and none shows account data or error details.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::metrics::metrics as registry;

/// Oldest unpublished event tolerated before the instance reports itself lagging.
const MAX_BACKLOG_SECONDS: f64 = 60.0;

/// The relay's backlog: (rows, age of the oldest in seconds); PostgreSQL only.
async fn relay_backlog(state: &AppState) -> Option<(i64, f64)> {
    let pool = state.store.pg_pool()?;
    sqlx::query_as::<_, (i64, f64)>(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(recorded_at))::float8, 0) FROM outbox",
    )
    .fetch_one(pool)
    .await
    .ok()
}

/// Ready when the database answers, the brokers answer (with the bus), committed events
/// reach the events topic within a minute, and no consumer halted.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    // The answer says what is down, never why (errors can name hosts and users): the
    // log has the details.
    match state.store.ping().await {
        Ok(()) => checks.insert("database".into(), json!("ok")),
        Err(e) => {
            ready = false;
            tracing::warn!(error = %e, "readiness: the database does not answer");
            checks.insert("database".into(), json!("down"))
        }
    };
    if let Some(probe) = &state.bus {
        match probe.ping(Duration::from_secs(2)).await {
            Ok(()) => checks.insert("broker".into(), json!("ok")),
            Err(e) => {
                ready = false;
                tracing::warn!(error = %e, "readiness: the brokers do not answer");
                checks.insert("broker".into(), json!("down"))
            }
        };
        if let Some((rows, age)) = relay_backlog(&state).await {
            let ok = age <= MAX_BACKLOG_SECONDS;
            ready &= ok;
            checks.insert(
                "relay_backlog".into(),
                json!({"records": rows, "oldest_seconds": age, "ok": ok}),
            );
        }
    }
    // A consumer whose offset fell out of the log consumes nothing until repaired.
    let halted = state.halts.current();
    if !halted.is_empty() {
        ready = false;
        let parts: serde_json::Map<String, Value> = halted
            .into_iter()
            .map(|(part, _)| (part, json!("halted: offset out of range (see the log)")))
            .collect();
        checks.insert("consumers".into(), Value::Object(parts));
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body: Value =
        json!({"status": if ready { "ready" } else { "unavailable" }, "checks": checks});
    (status, Json(body))
}

/// `GET /v1/log-key`: the public key that verifies the log's signatures, and those of
/// earlier signing keys (no token: an auditor needs nothing secret).
pub async fn log_key(State(state): State<AppState>) -> impl IntoResponse {
    let previous: Vec<String> = state
        .log_keys
        .previous()
        .iter()
        .map(|k| k.to_base64())
        .collect();
    Json(json!({
        "algorithm": keyledger_events::signature::ALGORITHM,
        "public_key": state.log_keys.current().to_base64(),
        "previous_public_keys": previous,
    }))
}

/// Every metric, with the gauges that live in the database read now.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let m = registry();
    if state.bus.is_some() {
        if let Some((rows, age)) = relay_backlog(&state).await {
            m.set("keyledger_relay_backlog_records", &[], rows as f64);
            m.set("keyledger_relay_backlog_seconds", &[], age);
        }
    }
    if let Ok(due) = state.saga.due_now(state.clock.now()).await {
        m.set("keyledger_reminders_due", &[], due as f64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}
