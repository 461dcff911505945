//! Extractors that turn every malformed request into a JSON `invalid_request` error, and
//! the bearer-token check.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;

/// `Json<T>` whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::invalid_request("the body must be JSON with 'Content-Type: application/json'")
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::invalid_request(format!("the body is not valid JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => ApiError::invalid_request(format!(
            "the body does not match the request: {}",
            e.body_text()
        )),
        other => ApiError::new(other.status(), "invalid_request", other.body_text()),
    }
}

/// The request body as JSON, parsed borrowing from `body` (for the hot path; the same
/// errors as [`ApiJson`]).
pub fn json_body<'a, T: serde::Deserialize<'a>>(
    headers: &HeaderMap,
    body: &'a [u8],
) -> Result<T, ApiError> {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let essence = v
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            essence == "application/json"
                || (essence.starts_with("application/") && essence.ends_with("+json"))
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::invalid_request(
            "the body must be JSON with 'Content-Type: application/json'",
        ));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::invalid_request(format!("the body does not match the request: {e}"))
        }
        _ => ApiError::invalid_request(format!("the body is not valid JSON: {e}")),
    })
}

/// The optional `Idempotency-Key` header: the command id of a retried request.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<Uuid>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| Uuid::parse_str(s.trim()).ok())
            .map(Some)
            .ok_or_else(|| ApiError::invalid_request("Idempotency-Key must be a UUID")),
    }
}

/// Middleware: every route it wraps needs `Authorization: Bearer <token>`.
pub async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        // blake3::Hash compares in constant time.
        Some(token) if blake3::hash(token.as_bytes()) == state.token_hash => {
            Ok(next.run(req).await)
        }
        _ => Err(ApiError::unauthorized()),
    }
}
