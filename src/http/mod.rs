//! The HTTP API (axum): the routes of `CONTRACT.md`, each a thin client of the command
//! handler or the read side. Described in `docs/openapi.yaml`, served at `/openapi.yaml`.

mod error;
mod extract;
mod health;
mod keys;
mod leaks;
pub mod reminders;
mod verify;

use std::sync::Arc;

use axum::http::Method;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Json, Router};
use serde_json::json;

pub use error::ApiError;

use crate::domain::Clock;
use crate::handler::CommandHandler;
use crate::read_side::ReadSide;
use crate::store::Store;
use crate::tokens::Role;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every request may use; shared, so handing it to a request is one reference count.
pub type AppState = Arc<Services>;

pub struct Services {
    pub handler: Arc<CommandHandler>,
    pub read_side: Arc<ReadSide>,
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    /// The API tokens and their roles (re-read when the tokens file changes).
    pub tokens: crate::tokens::Tokens,
    /// The public half of the key that signs the log.
    pub log_keys: keyledger_events::signature::LogKeys,
    /// The rationed slow path of migrated legacy keys.
    pub legacy: Arc<crate::read_side::legacy::LegacyGate>,
    pub saga: Arc<crate::reminders::saga::Saga>,
    /// Consumers that stopped because the log no longer holds what they must read.
    pub halts: crate::kafka::halt::Halts,
    /// Set when the bus is on: readiness asks the brokers.
    pub bus: Option<crate::kafka::BusProbe>,
    /// Revokes reported keys and tells their contacts.
    pub leaks: Arc<crate::leaks::LeakDesk>,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token: probes, scrapers, the log's public key.
    Open,
    /// A token of one of these roles (an admin token may call everything).
    Roles(&'static [Role]),
}

/// The roles of each kind of route (`CONTRACT.md`, "Scoped tokens").
const KEY_COMMANDS: Access = Access::Roles(&[Role::Issuer]);
const READS: Access = Access::Roles(&[Role::Issuer, Role::Reader]);
const VERIFY: Access = Access::Roles(&[Role::Verifier]);
const LEAKS: Access = Access::Roles(&[Role::Reporter]);
const ANY_TOKEN: Access =
    Access::Roles(&[Role::Issuer, Role::Reader, Role::Verifier, Role::Reporter]);

/// One route: a method on a path, its handler, who may call it.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub handler: MethodRouter<AppState>,
    pub access: Access,
}

fn route(
    method: Method,
    path: &'static str,
    handler: MethodRouter<AppState>,
    access: Access,
) -> Route {
    Route {
        method,
        path,
        handler,
        access,
    }
}

/// Every route. The router and the gate in front of it are built from this list, and a
/// test checks the OpenAPI document against it.
pub fn routes() -> Vec<Route> {
    use Access::*;
    const KEYS: &str = "/v1/accounts/{account_id}/keys";
    const KEY: &str = "/v1/accounts/{account_id}/keys/{key_id}";
    vec![
        route(Method::GET, "/livez", get(livez), Open),
        route(Method::GET, "/healthz", get(healthz), Open),
        route(Method::GET, "/readyz", get(health::readyz), Open),
        route(Method::GET, "/metrics", get(health::metrics), Open),
        route(Method::POST, KEYS, post(keys::generate), KEY_COMMANDS),
        route(Method::GET, KEYS, get(keys::list), READS),
        route(
            Method::PUT,
            "/v1/accounts/{account_id}/keys/{key_id}/contacts",
            put(keys::update_contacts),
            KEY_COMMANDS,
        ),
        route(Method::DELETE, KEY, delete(keys::revoke), KEY_COMMANDS),
        route(
            Method::GET,
            "/v1/accounts/{account_id}/keys/{key_id}/history",
            get(keys::history),
            READS,
        ),
        route(
            Method::POST,
            "/v1/accounts/{account_id}/keys/{key_id}/rotate",
            post(keys::rotate),
            KEY_COMMANDS,
        ),
        route(
            Method::POST,
            "/v1/accounts/{account_id}/legacy-key",
            post(keys::migrate_legacy),
            KEY_COMMANDS,
        ),
        route(Method::POST, "/v1/verify", post(verify::verify), VERIFY),
        route(Method::POST, "/v1/leaks", post(leaks::report), LEAKS),
        route(
            Method::GET,
            "/v1/reminders",
            get(reminders::upcoming),
            READS,
        ),
        route(Method::GET, "/openapi.yaml", get(openapi), ANY_TOKEN),
        route(Method::GET, "/v1/log-key", get(health::log_key), Open),
    ]
}

/// The router alone (no gate): what the routes do.
fn router(state: AppState, routes: Vec<Route>) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<AppState>)> = Vec::new();
    for r in routes {
        match by_path.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, handlers)) => *handlers = std::mem::take(handlers).merge(r.handler),
            None => by_path.push((r.path, r.handler)),
        }
    }
    by_path
        .into_iter()
        .fold(Router::new(), |router, (path, handlers)| {
            router.route(path, handlers)
        })
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The HTTP service: the gate, which lets a request through to the router only when its
/// route is open or it carries a valid token, in front of the router. Checking here, once
/// per request, costs a path match and a hash; a middleware on every route would also
/// clone the route's boxed service on every call.
#[derive(Clone)]
pub struct Gate {
    router: Router,
    access: Arc<matchit::Router<Vec<(Method, Access)>>>,
    state: AppState,
}

/// Builds the HTTP service; with `metrics_elsewhere`, `/metrics` is left to
/// [`metrics_service`] on a listener of its own.
pub fn service(state: AppState, metrics_elsewhere: bool) -> Gate {
    let routes: Vec<Route> = routes()
        .into_iter()
        .filter(|r| !(metrics_elsewhere && r.path == "/metrics"))
        .collect();
    let mut table: Vec<(&'static str, Vec<(Method, Access)>)> = Vec::new();
    for r in &routes {
        match table.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, methods)) => methods.push((r.method.clone(), r.access)),
            None => table.push((r.path, vec![(r.method.clone(), r.access)])),
        }
    }
    let mut access = matchit::Router::new();
    for (path, methods) in table {
        // The paths are the router's own: a clash would have failed the router too.
        let _ = access.insert(path, methods);
    }
    Gate {
        router: router(state.clone(), routes),
        access: Arc::new(access),
        state,
    }
}

/// `/metrics` alone, for its own listener (`KEYLEDGER_METRICS_LISTEN`).
pub fn metrics_service(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .with_state(state)
}

impl Gate {
    /// Who may call `method` on `path`; `None` for a route that does not exist (the router
    /// answers it: 404 or 405).
    fn access(&self, method: &Method, path: &str) -> Option<Access> {
        let found = self.access.at(path).ok()?;
        found
            .value
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, a)| *a)
    }
}

impl tower::Service<axum::extract::Request> for Gate {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        std::future::Ready<Result<Self::Response, Self::Error>>,
        <Router as tower::Service<axum::extract::Request>>::Future,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: axum::extract::Request) -> Self::Future {
        let refused = match self.access(req.method(), req.uri().path()) {
            Some(Access::Open) | None => None,
            Some(Access::Roles(roles)) => match extract::caller(req.headers(), &self.state) {
                None => Some(ApiError::unauthorized()),
                Some(caller) if caller.role == Role::Admin || roles.contains(&caller.role) => {
                    req.extensions_mut().insert(caller);
                    None
                }
                Some(caller) => Some(ApiError::forbidden(caller.role)),
            },
        };
        match refused {
            None => futures::future::Either::Right(tower::Service::call(&mut self.router, req)),
            Some(e) => futures::future::Either::Left(std::future::ready(Ok(e.into_response()))),
        }
    }
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
    /// Every route the router serves is described in the OpenAPI document, with its method.
    #[test]
    fn openapi_describes_every_route() {
        let doc = include_str!("../../docs/openapi.yaml");
        for r in super::routes() {
            let at = doc
                .find(&format!("\n  {}:", r.path))
                .unwrap_or_else(|| panic!("{} is missing from docs/openapi.yaml", r.path));
            let rest = &doc[at + 1..];
            let end = rest[2..].find("\n  /").map(|e| e + 2).unwrap_or(rest.len());
            let method = format!("    {}:", r.method.as_str().to_ascii_lowercase());
            assert!(
                rest[..end].contains(&method),
                "{} {} is missing from docs/openapi.yaml",
                r.method,
                r.path
            );
        }
    }
}
