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
use axum::routing::{delete, get, post, put};
use axum::{middleware, Json, Router};
use serde_json::json;

pub use error::ApiError;

use crate::domain::Clock;
use crate::handler::CommandHandler;
use crate::read_side::ReadSide;
use crate::store::Store;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub handler: Arc<CommandHandler>,
    pub read_side: Arc<ReadSide>,
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    pub token_hash: blake3::Hash,
    pub saga: Arc<crate::reminders::saga::Saga>,
    /// Consumers that stopped because the log no longer holds what they must read.
    pub halts: crate::bus::halt::Halts,
    /// Set when the bus is on: readiness asks the brokers.
    pub bus: Option<crate::bus::BusProbe>,
}

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route(
            "/v1/accounts/{account_id}/keys",
            post(keys::generate).get(keys::list),
        )
        .route(
            "/v1/accounts/{account_id}/keys/{key_id}/contacts",
            put(keys::update_contacts),
        )
        .route(
            "/v1/accounts/{account_id}/keys/{key_id}",
            delete(keys::revoke),
        )
        .route(
            "/v1/accounts/{account_id}/keys/{key_id}/rotate",
            post(keys::rotate),
        )
        .route(
            "/v1/accounts/{account_id}/legacy-key",
            post(keys::migrate_legacy),
        )
        .route("/v1/verify", post(verify::verify))
        .route("/v1/reminders", get(reminders::upcoming))
        .route("/openapi.yaml", get(openapi))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            extract::require_token,
        ));
    Router::new()
        .route("/livez", get(livez))
        .route("/healthz", get(healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .merge(protected)
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
        let source = include_str!("mod.rs");
        let start = source.find("pub fn router").unwrap_or(0);
        let end = source.find("async fn healthz").unwrap_or(source.len());
        let served: Vec<&str> = source[start..end]
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with('/'))
            .collect();
        assert!(served.len() >= 8, "found {served:?}");
        for path in served {
            assert!(
                doc.contains(&format!("  {path}:")),
                "{path} is missing from docs/openapi.yaml"
            );
        }
    }
}
