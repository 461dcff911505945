//! Extractors that turn every malformed request into a JSON `invalid_request` error, and
//! the bearer-token check.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
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

/// `Query<T>` whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiError::invalid_request(format!(
                "the query does not match the request: {}",
                rejection.body_text()
            ))),
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
    content_type: JsonContentType,
    body: &'a [u8],
) -> Result<T, ApiError> {
    if !content_type.0 {
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

/// Who the request's `Authorization: Bearer <token>` names, if it names a known token
/// (found in constant time, see [`crate::tokens`]).
pub fn caller(headers: &HeaderMap, state: &AppState) -> Option<crate::tokens::Caller> {
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)?;
    state.tokens.caller(token)
}

/// Whether the request says its body is JSON (`application/json`, or `application/*+json`),
/// read from the headers in place.
pub struct JsonContentType(pub bool);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for JsonContentType {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    let essence = v.split(';').next().unwrap_or_default().trim();
                    essence.eq_ignore_ascii_case("application/json")
                        || (essence.len() > 17
                            && essence[..12].eq_ignore_ascii_case("application/")
                            && essence.ends_with("+json"))
                }),
        ))
    }
}
