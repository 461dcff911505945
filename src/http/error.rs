//! API errors: a stable machine code, a human message, the right 4xx.
//!
//! Messages are built from caller input and the domain's error texts only, never from a
//! key. Rejections are logged by code, not by message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyledger_events::ErrorBody;
use serde::Serialize;

use crate::handler::HandleError;
use crate::keyring::KeyringError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct Envelope {
    error: ErrorBody,
}

impl ApiError {
    /// An error answer. A key-shaped string in `message` (serde may quote the input) is
    /// reduced to its last five: an error message can end up in a proxy's or client's log.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            status,
            code,
            message: crate::domain::api_key::redact_keys(&message).into_owned(),
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid 'Authorization: Bearer <token>' header is required",
        )
    }

    /// A known token outside its role.
    pub fn forbidden(role: crate::tokens::Role) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("a {} token may not call this route", role.as_str()),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

/// The HTTP status of each domain rejection.
pub fn status_of(e: &KeyringError) -> StatusCode {
    match e {
        KeyringError::InvalidAccountId(_)
        | KeyringError::InvalidLabel(_)
        | KeyringError::InvalidContacts(_)
        | KeyringError::InvalidLoginEmail(_)
        | KeyringError::InvalidGrace { .. }
        | KeyringError::InvalidStage
        | KeyringError::InvalidLegacyHash(_)
        | KeyringError::CreatedInFuture => StatusCode::BAD_REQUEST,
        KeyringError::KeyNotFound(_) => StatusCode::NOT_FOUND,
        KeyringError::KeyRevoked(_) => StatusCode::GONE,
        KeyringError::LoginEmailMismatch { .. }
        | KeyringError::DuplicateLabel(_)
        | KeyringError::KeyLimitReached { .. }
        | KeyringError::KeyExpired(_)
        | KeyringError::KeyAlreadyRotated { .. }
        | KeyringError::KeyNotExpired { .. }
        | KeyringError::ReminderNotDue { .. }
        | KeyringError::NothingToRetire(_)
        | KeyringError::LegacyAlreadyMigrated(_) => StatusCode::CONFLICT,
        KeyringError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<KeyringError> for ApiError {
    fn from(e: KeyringError) -> Self {
        Self::new(status_of(&e), e.code(), e.to_string())
    }
}

impl From<HandleError> for ApiError {
    fn from(e: HandleError) -> Self {
        match e {
            HandleError::Rejected(e) => e.into(),
            HandleError::Contended => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
            }
            HandleError::IdempotencyKeyReused => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was used before for another request; use a new one",
            ),
            HandleError::Unavailable(_) => {
                Self::unavailable("the event store is unavailable; try again")
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        Self::unavailable("the database is unavailable; try again")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(
                code = self.code,
                status = self.status.as_u16(),
                "request failed"
            );
        } else {
            tracing::info!(
                code = self.code,
                status = self.status.as_u16(),
                "request rejected"
            );
        }
        let body = Envelope {
            error: ErrorBody {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
