//! Assembling the service — store, read side, command handler, HTTP, and with the bus the
//! relay, the command consumer, the projector and the index follower — and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::commands::CommandConsumer;
use crate::bus::follower::{load_index, Follower};
use crate::bus::halt::Halts;
use crate::bus::projector::Projector;
use crate::bus::publisher::Publisher;
use crate::bus::relay::Relay;
use crate::config::{DataFiles, Settings, Storage};
use crate::domain::KeyHasher;
use crate::feed::{self, Reaction};
use crate::handler::CommandHandler;
use crate::http::{router, AppState};
use crate::keyring::KeyringServices;
use crate::notify::dispatch::Notifier;
use crate::read_side::ReadSide;
use crate::reminders::saga::{Firing, Saga};
use crate::store::reactions::Reactions;
use crate::store::Store;

/// A built service: bound to its port (when it serves HTTP), background parts running.
pub struct Application {
    listener: Option<TcpListener>,
    router: axum::Router,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
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
        let read_side = Arc::new(
            ReadSide::new(hasher.clone(), settings.default_from.clone())
                .with_legacy_salt(settings.legacy_salt.clone()),
        );
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let halts = Halts::default();
        let roles = settings.roles;

        match (&settings.bus, store.pg_pool().cloned()) {
            (Some(bus), Some(pool)) => {
                bus.ensure_topics()
                    .await
                    .context("the Kafka topics are not fit for keyledger")?;
                read_side.leave_listing_to_projector();
                if roles.http {
                    let from = load_index(bus, &store, &read_side)
                        .await
                        .context("cannot load the verification index")?;
                    let follower =
                        Follower::new(bus.clone(), read_side.clone(), from, halts.clone());
                    tasks.push(tokio::spawn(follower.run(stopped.clone())));
                }
                if roles.relay {
                    let relay = Relay::new(
                        pool.clone(),
                        Publisher::new(bus, 5)?,
                        bus.events_topic(),
                        bus.relay_batch,
                    );
                    tasks.push(tokio::spawn(relay.run(stopped.clone())));
                }
                if roles.projector {
                    let projector =
                        Projector::new(bus.clone(), store.clone(), pool.clone(), halts.clone());
                    tasks.push(tokio::spawn(projector.run(stopped.clone())));
                }
            }
            _ => {
                if !(roles.http || roles.commands || roles.saga || roles.notifier) {
                    anyhow::bail!(
                        "the relay and projector roles need the bus (KEYLEDGER_KAFKA_BROKERS)"
                    );
                }
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
                if let Some(listener) = store
                    .listen()
                    .await
                    .context("cannot LISTEN for other instances' commits")?
                {
                    let (s, r) = (store.clone(), read_side.clone());
                    tasks.push(tokio::spawn(follow_other_writers(
                        listener,
                        s,
                        r,
                        stopped.clone(),
                    )));
                }
            }
        }

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
        if let (Some(bus), Some(pool), true) = (&settings.bus, store.pg_pool(), roles.commands) {
            let consumer = CommandConsumer::new(
                bus.clone(),
                pool.clone(),
                handler.clone(),
                Publisher::new(bus, 0)?,
                halts.clone(),
            );
            tasks.push(tokio::spawn(Arc::new(consumer).run(stopped.clone())));
        }
        let saga = Arc::new(Saga::new(
            Reactions::of(&store),
            settings.reminders.stages.clone(),
        ));
        let bus_pool = match (&settings.bus, store.pg_pool()) {
            (Some(bus), Some(pool)) => Some((bus.clone(), pool.clone())),
            _ => None,
        };
        if roles.saga {
            tasks.push(spawn_feed(
                &saga, &bus_pool, &store, &handler, &halts, &stopped,
            ));
            let firing = Firing {
                saga: saga.clone(),
                handler: handler.clone(),
                clock: settings.clock.clone(),
                tick: settings.reminders.tick,
            };
            tasks.push(tokio::spawn(firing.run(stopped.clone())));
        }
        if roles.notifier {
            let producer = match &bus_pool {
                Some((bus, _)) => Some((Publisher::new(bus, 5)?, bus.notifications_topic())),
                None => None,
            };
            let r = &settings.reminders;
            let notifier = Arc::new(Notifier::new(
                Reactions::of(&store),
                r.templates.clone(),
                r.stages.last(),
                producer,
                r.smtp.clone(),
                r.poll,
            ));
            tasks.push(spawn_feed(
                &notifier, &bus_pool, &store, &handler, &halts, &stopped,
            ));
            tasks.push(tokio::spawn(notifier.send_loop(stopped.clone())));
        }
        let state = AppState {
            bus: match &settings.bus {
                Some(bus) => Some(bus.probe()?),
                None => None,
            },
            saga,
            handler,
            halts,
            read_side,
            store,
            clock: settings.clock.clone(),
            token_hash: blake3::hash(settings.api_token.expose().as_bytes()),
        };
        let listener = if roles.http {
            Some(
                TcpListener::bind(&settings.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", settings.listen))?,
            )
        } else {
            None
        };
        Ok(Self {
            listener,
            router: router(state.clone()),
            tasks,
            stop,
            state,
        })
    }

    /// The HTTP address, when this process serves HTTP.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "this process does not serve HTTP",
            )),
        }
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests and lets the
    /// background parts finish what they hold (10 s at most).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let result = match self.listener {
            Some(listener) => {
                axum::serve(listener, self.router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            None => {
                shutdown.await;
                Ok(())
            }
        };
        let _ = self.stop.send(true);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        result
    }
}

/// Follows commits of other instances sharing the database (no bus): each notification
/// names an account, which is caught up from the store. When the listening connection was
/// lost (notifications may have been missed), everything is replayed.
async fn follow_other_writers(
    mut listener: sqlx::postgres::PgListener,
    store: Arc<Store>,
    read_side: Arc<ReadSide>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            n = listener.try_recv() => n,
            _ = stop.changed() => return,
        };
        match next {
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
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Feeds a reaction to the log from the events topic when the bus is on, else from the
/// event store.
fn spawn_feed<R: Reaction>(
    reaction: &Arc<R>,
    bus_pool: &Option<(crate::bus::BusConfig, sqlx::PgPool)>,
    store: &Arc<Store>,
    handler: &CommandHandler,
    halts: &Halts,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    match bus_pool {
        Some((bus, pool)) => tokio::spawn(feed::from_bus(
            reaction.clone(),
            bus.clone(),
            store.clone(),
            pool.clone(),
            halts.clone(),
            stop.clone(),
        )),
        None => tokio::spawn(feed::from_store(
            reaction.clone(),
            store.clone(),
            handler.subscribe_commits(),
            stop.clone(),
        )),
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
