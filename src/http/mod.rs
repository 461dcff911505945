//! The HTTP API (axum): the routes of `CONTRACT.md`, each a thin client of the command
//! handler or the read side. Described in `docs/openapi.yaml`, served at `/openapi.yaml`.

mod error;
mod extract;
mod health;
mod keys;
pub mod reminders;
mod verify;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{middleware, Json, Router};
use serde_json::json;

pub use error::ApiError;

use crate::domain::Clock;
use crate::handler::CommandHandler;
use crate::read_side::ReadSide;
use crate::store::Store;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every request may use; shared, so handing it to a request is one reference count.
pub type AppState = Arc<Services>;

pub struct Services {
    pub handler: Arc<CommandHandler>,
    pub read_side: Arc<ReadSide>,
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    pub token_hash: blake3::Hash,
    pub saga: Arc<crate::reminders::saga::Saga>,
    /// Consumers that stopped because the log no longer holds what they must read.
    pub halts: crate::kafka::halt::Halts,
    /// Set when the bus is on: readiness asks the brokers.
    pub bus: Option<crate::kafka::BusProbe>,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token: probes, scrapers.
    Open,
    /// A bearer token.
    Token,
}

/// Every route: its path, its handlers, who may call it. The router is built from this
/// list, and a test checks the OpenAPI document against it.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>, Access)> {
    use Access::*;
    vec![
        ("/livez", get(livez), Open),
        ("/healthz", get(healthz), Open),
        ("/readyz", get(health::readyz), Open),
        ("/metrics", get(health::metrics), Open),
        (
            "/v1/accounts/{account_id}/keys",
            post(keys::generate).get(keys::list),
            Token,
        ),
        (
            "/v1/accounts/{account_id}/keys/{key_id}/contacts",
            put(keys::update_contacts),
            Token,
        ),
        (
            "/v1/accounts/{account_id}/keys/{key_id}",
            delete(keys::revoke),
            Token,
        ),
        (
            "/v1/accounts/{account_id}/keys/{key_id}/rotate",
            post(keys::rotate),
            Token,
        ),
        (
            "/v1/accounts/{account_id}/legacy-key",
            post(keys::migrate_legacy),
            Token,
        ),
        ("/v1/verify", post(verify::verify), Token),
        ("/v1/reminders", get(reminders::upcoming), Token),
        ("/openapi.yaml", get(openapi), Token),
    ]
}

pub fn router(state: AppState) -> Router {
    let (mut open, mut protected) = (Router::new(), Router::new());
    for (path, handlers, access) in routes() {
        match access {
            Access::Open => open = open.route(path, handlers),
            Access::Token => protected = protected.route(path, handlers),
        }
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(
        state.clone(),
        extract::require_token,
    ));
    open.merge(protected)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The process answers, and nothing else is asked: for an orchestrator's liveness probe
/// (a database outage is not cured by restarting keyledger) and as the bare endpoint the
/// HTTP benchmark measures verification against.
async fn livez() -> &'static str {
    "ok"
}

async fn healthz(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "database": "down"})),
        ),
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/yaml")],
        include_str!("../../docs/openapi.yaml"),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

#[cfg(test)]
mod tests {
    /// Every route the router serves is described in the OpenAPI document.
    #[test]
    fn openapi_describes_every_route() {
        let doc = include_str!("../../docs/openapi.yaml");
        for (path, _, _) in super::routes() {
            assert!(
                doc.contains(&format!("\n  {path}:")),
                "{path} is missing from docs/openapi.yaml"
            );
        }
    }
}
