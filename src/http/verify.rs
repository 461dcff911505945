//! `POST /v1/verify`: is this key valid, and may it send as this from address?
//!
//! The hot path of the sending API, so it allocates little: the body is parsed borrowing
//! from the request, the verdict is read borrowed from the index and serialised straight
//! into the response bytes.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{json_body, JsonContentType};
use super::AppState;
use crate::read_side::{Rejection, ValidKey};

#[derive(Deserialize)]
struct VerifyBody<'a> {
    #[serde(borrow)]
    api_key: Cow<'a, str>,
    #[serde(default, borrow)]
    from: Option<Cow<'a, str>>,
}

/// A valid key's answer.
#[derive(Serialize)]
struct Valid<'a> {
    valid: bool,
    account_id: &'a str,
    key_id: Uuid,
    label: &'a str,
    expires_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_allowed: Option<bool>,
}

/// Any other key's answer (the reason is for logs and the caller's own diagnosis).
#[derive(Serialize)]
struct Invalid {
    valid: bool,
    code: &'static str,
}

fn json(bytes: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

fn answer_valid(v: &ValidKey) -> Vec<u8> {
    serde_json::to_vec(&Valid {
        valid: true,
        account_id: &v.account_id,
        key_id: v.key_id,
        label: &v.label,
        expires_at: v.expires_at,
        from_allowed: v.from_allowed,
    })
    .unwrap_or_default()
}

fn answer_invalid(r: Rejection) -> Vec<u8> {
    serde_json::to_vec(&Invalid {
        valid: false,
        code: r.as_str(),
    })
    .unwrap_or_default()
}

pub async fn verify(
    State(state): State<AppState>,
    content_type: JsonContentType,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), "invalid_request", r.body_text()))?;
    let body: VerifyBody<'_> = json_body(content_type, &body)?;
    let now = state.clock.now();
    let started = std::time::Instant::now();
    let from = body.from.as_deref();
    // The verdict is borrowed from the index and serialised while it is held.
    let (outcome, mut bytes) = state
        .read_side
        .verify_with(&body.api_key, from, now, |verdict| match verdict {
            Ok(v) => {
                let bytes = serde_json::to_vec(&Valid {
                    valid: true,
                    account_id: v.key.account_id(),
                    key_id: v.key.key_id(),
                    label: v.key.label(),
                    expires_at: v.key.expires_at(),
                    from_allowed: v.from_allowed,
                })
                .unwrap_or_default();
                (Ok(v.key.key_id()), bytes)
            }
            Err(r) => (Err(r), Vec::new()),
        });
    let mut outcome: Result<Uuid, Rejection> = outcome;
    if outcome == Err(Rejection::Unknown) && state.read_side.legacy_enabled() {
        // Maybe a migrated legacy key: bcrypt, rationed, off the async threads, and in
        // about the same time whatever the answer.
        let legacy = state
            .legacy
            .verify(
                state.read_side.clone(),
                body.api_key.to_string(),
                from.map(str::to_owned),
                now,
            )
            .await;
        if let Ok(v) = &legacy {
            bytes = answer_valid(v);
        }
        outcome = legacy.map(|v| v.key_id);
    }
    crate::metrics::metrics().verified(
        match &outcome {
            Ok(_) => "valid",
            Err(r) => r.as_str(),
        },
        started.elapsed(),
    );
    Ok(json(match outcome {
        Ok(key_id) => {
            tracing::debug!(%key_id, "key verified");
            bytes
        }
        Err(reason) => {
            tracing::debug!(reason = reason.as_str(), "key rejected");
            answer_invalid(reason)
        }
    }))
}
