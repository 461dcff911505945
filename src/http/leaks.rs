//! `POST /v1/leaks`: keys found where they should not be are revoked at once and their
//! contacts told (the [`crate::leaks`] desk). The answer names no account, label or contact.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use uuid::Uuid;

use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;
use crate::leaks::{LeakError, Report};
use crate::tokens::Caller;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeakBody {
    keys: Vec<String>,
    source: String,
    #[serde(default)]
    reporter: String,
}

impl From<LeakError> for ApiError {
    fn from(e: LeakError) -> Self {
        match e {
            LeakError::Unavailable(_) => {
                ApiError::unavailable("the event store is unavailable; report again")
            }
            other => ApiError::invalid_request(other.to_string()),
        }
    }
}

pub async fn report(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<LeakBody>,
) -> Result<Response, ApiError> {
    let report = Report::parse(body.keys, &body.source, &body.reporter)?;
    let results = state
        .leaks
        .report(Uuid::new_v4(), &caller.name, &report)
        .await?;
    Ok(Json(serde_json::json!({ "results": results })).into_response())
}
