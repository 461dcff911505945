//! `POST /v1/verify`: is this key valid, and may it send as this from address?

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;
use crate::read_side::Rejection;

#[derive(Deserialize)]
pub struct VerifyBody {
    api_key: String,
    #[serde(default)]
    from: Option<String>,
}

pub async fn verify(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<VerifyBody>,
) -> Result<Json<Value>, ApiError> {
    let now = state.clock.now();
    let started = std::time::Instant::now();
    let mut outcome = state
        .read_side
        .verify(&body.api_key, body.from.as_deref(), now);
    if outcome == Err(Rejection::Unknown) && state.read_side.needs_legacy_check(&body.api_key) {
        // bcrypt takes tens of milliseconds: off the async threads.
        let read_side = state.read_side.clone();
        outcome = tokio::task::spawn_blocking(move || {
            read_side.verify_legacy(&body.api_key, body.from.as_deref(), now)
        })
        .await
        .unwrap_or(Err(Rejection::Unknown));
    }
    crate::metrics::metrics().verified(
        match &outcome {
            Ok(_) => "valid",
            Err(r) => r.as_str(),
        },
        started.elapsed(),
    );
    Ok(Json(match outcome {
        Ok(valid) => {
            tracing::debug!(account_id = %valid.account_id, key_id = %valid.key_id, "key verified");
            let mut v = json!({"valid": true});
            if let (Value::Object(map), Ok(Value::Object(facts))) =
                (&mut v, serde_json::to_value(&valid))
            {
                map.extend(facts);
            }
            v
        }
        Err(reason) => {
            tracing::debug!(reason = reason.as_str(), "key rejected");
            json!({"valid": false, "code": reason.as_str()})
        }
    }))
}
