//! Assembling the service: store, read side, command handler, HTTP — and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{DataFiles, Settings, Storage};
use crate::domain::KeyHasher;
use crate::handler::CommandHandler;
use crate::http::{router, AppState};
use crate::keyring::KeyringServices;
use crate::read_side::ReadSide;
use crate::store::Store;

/// A built service, bound to its port, not yet serving.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    follower: Option<tokio::task::JoinHandle<()>>,
    pub state: AppState,
}

/// Opens the configured store and brings its schema up to date.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let store = match &settings.storage {
        Storage::Postgres { url } => {
            Store::connect_postgres(url.expose(), settings.max_db_connections)
                .await
                .context("cannot connect to PostgreSQL (KEYLEDGER_DATABASE_URL)")?
        }
        Storage::Embedded { data_dir } => {
            let path = DataFiles::in_dir(data_dir).database;
            Store::open_sqlite(&path)
                .await
                .with_context(|| format!("cannot open the embedded store {}", path.display()))?
        }
    };
    store
        .migrate()
        .await
        .context("cannot bring the database schema up to date")?;
    Ok(store)
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = Arc::new(open_store(&settings).await?);
        let hasher = KeyHasher::new(settings.pepper.expose().as_bytes());
        let read_side = Arc::new(ReadSide::new(hasher.clone(), settings.default_from.clone()));
        let stats = read_side
            .rebuild(&store)
            .await
            .context("cannot rebuild the read side")?;
        tracing::info!(
            events = stats.events,
            accounts = stats.accounts,
            seconds = stats.seconds,
            "read side rebuilt from the event store"
        );
        // Other instances' commits reach this one's index through LISTEN/NOTIFY.
        let follower = store
            .listen()
            .await
            .context("cannot LISTEN for other instances' commits")?
            .map(|l| tokio::spawn(follow_other_writers(l, store.clone(), read_side.clone())));
        let services = KeyringServices {
            clock: settings.clock.clone(),
            policy: settings.policy.clone(),
        };
        let handler = Arc::new(CommandHandler::new(
            store.clone(),
            services,
            hasher,
            read_side.clone(),
        ));
        let state = AppState {
            handler,
            read_side,
            store,
            clock: settings.clock.clone(),
            token_hash: blake3::hash(settings.api_token.expose().as_bytes()),
        };
        let listener = TcpListener::bind(&settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        Ok(Self {
            listener,
            router: router(state.clone()),
            follower,
            state,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let result = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        if let Some(f) = self.follower {
            f.abort();
        }
        result
    }
}

/// Follows commits of other instances sharing the database: each notification names an
/// account, which is caught up from the store. When the listening connection was lost
/// (notifications may have been missed), everything is replayed.
async fn follow_other_writers(
    mut listener: sqlx::postgres::PgListener,
    store: Arc<Store>,
    read_side: Arc<ReadSide>,
) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => {
                if let Err(e) = read_side.catch_up_account(&store, n.payload()).await {
                    tracing::warn!(error = %e, "cannot catch up an account changed by another instance");
                }
            }
            Ok(None) => {
                tracing::warn!("lost the LISTEN connection; replaying the store to miss nothing");
                if let Err(e) = read_side.rebuild(&store).await {
                    tracing::warn!(error = %e, "replay after reconnect failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
