//! `GET /v1/reminders`: the reminders and expiries ahead, for operators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::ApiQuery;
use super::AppState;

#[derive(Deserialize)]
pub struct UpcomingQuery {
    /// Only this account's keys.
    account_id: Option<String>,
    /// How far ahead to look (default 30 days, at most 400).
    days: Option<i64>,
}

/// One reminder stage or expiry ahead.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Upcoming {
    pub account_id: String,
    pub key_id: Uuid,
    pub label: String,
    pub last_five: String,
    /// `expiry_reminder` or `expiry`.
    pub kind: String,
    /// Days before expiry (absent for the expiry itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
    pub due_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub recipients: Vec<String>,
}

/// Most keys one listing covers.
const MAX_KEYS: i64 = 10_000;

pub async fn upcoming(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<UpcomingQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let days = q.days.unwrap_or(30);
    if !(0..=400).contains(&days) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "days must be between 0 and 400",
        ));
    }
    let until = state.clock.now() + Duration::days(days);
    let schedules = state
        .saga
        .upcoming(until, q.account_id.as_deref(), MAX_KEYS)
        .await?;
    let mut out: Vec<Upcoming> = schedules
        .iter()
        .flat_map(|s| {
            s.upcoming()
                .into_iter()
                .filter(|(_, due)| *due <= until)
                .map(|(stage, due_at)| Upcoming {
                    account_id: s.account_id.clone(),
                    key_id: s.key_id,
                    label: s.label.clone(),
                    last_five: s.last_five.clone(),
                    kind: if stage == 0 {
                        "expiry"
                    } else {
                        "expiry_reminder"
                    }
                    .into(),
                    stage: (stage > 0).then_some(stage),
                    due_at,
                    expires_at: s.expires_at,
                    recipients: s.recipients.clone(),
                })
        })
        .collect();
    out.sort_by(|a, b| {
        (a.due_at, &a.account_id, a.key_id).cmp(&(b.due_at, &b.account_id, b.key_id))
    });
    Ok(Json(
        serde_json::json!({ "until": until, "reminders": out }),
    ))
}
