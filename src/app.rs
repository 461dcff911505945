//! Assembling the service — store, read side, command handler, HTTP, the projections and
//! their feeds, the reminder saga and the notifier, and with the bus the relay, the command
//! consumer, the projector and the index follower — and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bus::commands::CommandConsumer;
use crate::bus::follower::Follower;
use crate::bus::relay::Relay;
use crate::config::{DataFiles, Settings, Storage};
use crate::domain::{KeyHasher, LogSigner};
use crate::handler::CommandHandler;
use crate::http::{AppState, Services};
use crate::kafka::halt::Halts;
use crate::kafka::publisher::Publisher;
use crate::keyring::KeyringServices;
use crate::notify::dispatch::{Notifier, NOTIFIER};
use crate::projection::from_topic::{self, TopicFeed, Vouch};
use crate::projection::{from_store, Projection};
use crate::read_side::listing::ListingTable;
use crate::read_side::ReadSide;
use crate::reminders::saga::{Firing, Saga, SAGA};
use crate::store::Store;
use crate::tokens::Tokens;
use keyledger_events::signature::LogKeys;

/// A built service: bound to its port (when it serves HTTP), background parts running.
pub struct Application {
    listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    service: crate::http::Gate,
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

/// Where a feed of the log reads from: the events topic (with the bus) or the store.
#[derive(Clone)]
enum Source {
    Topic(Box<TopicFeed>),
    Store,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = Arc::new(open_store(&settings).await?);
        refuse_new_secrets_for_an_old_store(&settings, &store).await?;
        let signer = LogSigner::from_base64(settings.signing_key.expose())
            .context("KEYLEDGER_SIGNING_KEY")?;
        let log_keys = LogKeys::new(signer.public_key(), settings.previous_log_keys.clone());
        let tokens = Tokens::new(
            settings.api_token.as_ref().map(|t| t.expose()),
            settings.tokens_file.clone(),
        )?;
        let hasher = KeyHasher::new(settings.pepper.expose().as_bytes());
        let read_side = Arc::new(
            ReadSide::new(hasher.clone(), settings.default_from.clone())
                .with_legacy_salt(settings.legacy_salt.clone()),
        );
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let halts = Halts::default();
        let roles = settings.roles;
        let source = match (&settings.bus, store.pg_pool()) {
            (Some(bus), Some(pool)) => {
                bus.ensure_topics()
                    .await
                    .context("the Kafka topics are not fit for keyledger")?;
                read_side.leave_listing_to_projector();
                Source::Topic(Box::new(TopicFeed {
                    bus: bus.clone(),
                    pool: pool.clone(),
                    halts: halts.clone(),
                    vouch: Vouch::new(bus, log_keys.clone())?,
                }))
            }
            _ => {
                if !(roles.http || roles.saga || roles.notifier) {
                    anyhow::bail!(
                        "the commands, relay and projector roles need the bus (KEYLEDGER_KAFKA_BROKERS)"
                    );
                }
                Source::Store
            }
        };

        // The in-memory index that `verify` answers from.
        if roles.http {
            // With the bus the follower starts where the topic ends before the catch-up;
            // without it, listening for other instances starts before the catch-up. Either
            // way nothing committed in between is missed.
            let follow_from = match &source {
                Source::Topic(feed) => {
                    let (bus, topic) = (feed.bus.clone(), feed.bus.events_topic());
                    Some(tokio::task::spawn_blocking(move || bus.end_offsets(&topic)).await??)
                }
                Source::Store => None,
            };
            let listener = match &source {
                Source::Store => store
                    .listen()
                    .await
                    .context("cannot LISTEN for other instances' commits")?,
                Source::Topic(_) => None,
            };
            // The listing (without the bus) is brought up to date at the same time.
            let heads = store.account_heads().await?;
            let (stats, _) = tokio::try_join!(
                async {
                    read_side
                        .start(&store, &heads)
                        .await
                        .context("cannot load the verification index")
                },
                catch_up_listing(&store, &source, &heads),
            )?;
            tracing::info!(
                from_snapshot = stats.from_snapshot,
                events = stats.events,
                accounts = stats.accounts,
                seconds = stats.seconds,
                keys = read_side.index_stats().keys,
                "verification index ready"
            );
            match (&source, follow_from, listener) {
                (Source::Topic(feed), Some(from), _) => {
                    let follower = Follower::new(
                        feed.bus.clone(),
                        read_side.clone(),
                        from,
                        feed.halts.clone(),
                        feed.vouch.clone(),
                    );
                    tasks.push(tokio::spawn(follower.run(stopped.clone())));
                }
                (_, _, Some(listener)) => {
                    tasks.push(tokio::spawn(read_side.clone().follow_other_writers(
                        listener,
                        store.clone(),
                        stopped.clone(),
                    )))
                }
                _ => {}
            }
            tasks.push(tokio::spawn(
                read_side
                    .clone()
                    .keep_snapshots(store.clone(), stopped.clone()),
            ));
        }

        if !roles.http {
            catch_up_listing(&store, &source, &store.account_heads().await?).await?;
        }

        let services = KeyringServices {
            clock: settings.clock.clone(),
            policy: settings.policy.clone(),
        };
        let handler = Arc::new(CommandHandler::new(
            store.clone(),
            services,
            hasher,
            signer.clone(),
            read_side.clone(),
        ));
        let legacy = Arc::new(crate::read_side::legacy::LegacyGate::new(
            settings.legacy_checks_per_second,
        ));
        let leaks = Arc::new(crate::leaks::LeakDesk::new(
            handler.clone(),
            read_side.clone(),
            store.clone(),
            legacy.clone(),
            settings.clock.clone(),
        ));
        tasks.push(tokio::spawn(tokens.clone().watch(stopped.clone())));
        let feed = |projection: Arc<dyn Projection>, name: &str| -> JoinHandle<()> {
            match &source {
                Source::Topic(feed) => tokio::spawn(from_topic::follow(
                    name.to_owned(),
                    vec![projection],
                    (**feed).clone(),
                    store.clone(),
                    stopped.clone(),
                )),
                Source::Store => tokio::spawn(from_store::follow(
                    projection,
                    store.clone(),
                    handler.subscribe_commits(),
                    stopped.clone(),
                )),
            }
        };
        if matches!(source, Source::Store) {
            tasks.push(feed(
                Arc::new(ListingTable),
                crate::read_side::listing::LISTING,
            ));
        }
        if let Source::Topic(feed) = &source {
            let TopicFeed {
                bus, pool, halts, ..
            } = &**feed;
            if roles.commands {
                let consumer = CommandConsumer::new(
                    bus.clone(),
                    pool.clone(),
                    handler.clone(),
                    leaks.clone(),
                    Publisher::new(bus, 0)?,
                    halts.clone(),
                );
                tasks.push(tokio::spawn(Arc::new(consumer).run(stopped.clone())));
            }
            if roles.relay {
                let relay = Relay::new(
                    pool.clone(),
                    Publisher::new(bus, 5)?,
                    bus.events_topic(),
                    bus.relay_batch,
                    signer.clone(),
                );
                tasks.push(tokio::spawn(relay.run(stopped.clone())));
            }
            if roles.projector {
                tasks.push(tokio::spawn(crate::bus::projector::run(
                    (**feed).clone(),
                    store.clone(),
                    stopped.clone(),
                )));
            }
        }
        if roles.http {
            tasks.push(tokio::spawn(crate::rotation::run(
                read_side.clone(),
                handler.clone(),
                stopped.clone(),
            )));
            match settings.usage_flush {
                Some(every) => {
                    let usage = crate::read_side::usage::UsageFlusher::new(
                        read_side.clone(),
                        store.clone(),
                        every,
                    );
                    tasks.push(tokio::spawn(usage.run(stopped.clone())));
                }
                None => read_side.set_usage_tracking(false),
            }
        }
        let saga = Arc::new(
            Saga::new(store.clone(), settings.reminders.stages.clone())
                .with_usage(settings.usage_flush.is_some()),
        );
        if roles.saga {
            tasks.push(feed(saga.clone(), SAGA));
            let firing = Firing {
                saga: saga.clone(),
                handler: handler.clone(),
                clock: settings.clock.clone(),
                tick: settings.reminders.tick,
            };
            tasks.push(tokio::spawn(firing.run(stopped.clone())));
        }
        if roles.notifier {
            let producer = match &source {
                Source::Topic(feed) => Some((
                    Publisher::new(&feed.bus, 5)?,
                    feed.bus.notifications_topic(),
                )),
                Source::Store => None,
            };
            let r = &settings.reminders;
            let notifier = Arc::new(Notifier::new(
                store.clone(),
                r.templates.clone(),
                r.stages.last(),
                producer,
                r.smtp.clone(),
                r.poll,
            ));
            tasks.push(feed(notifier.clone(), NOTIFIER));
            tasks.push(tokio::spawn(notifier.send_loop(stopped.clone())));
        }
        let state: AppState = Arc::new(Services {
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
            tokens,
            log_keys: log_keys.clone(),
            legacy,
            leaks,
        });
        let listener = if roles.http {
            Some(
                TcpListener::bind(&settings.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", settings.listen))?,
            )
        } else {
            None
        };
        let metrics_listener =
            match &settings.metrics_listen {
                Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                    format!("cannot listen on {addr} (KEYLEDGER_METRICS_LISTEN)")
                })?),
                None => None,
            };
        Ok(Self {
            listener,
            metrics_listener,
            service: crate::http::service(state.clone(), settings.metrics_listen.is_some()),
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

    /// The address of the metrics listener, when `/metrics` has one of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests and lets the
    /// background parts finish what they hold (10 s at most).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_metrics, metrics_stopped) = watch::channel(false);
        let metrics = self.metrics_listener.map(|listener| {
            let router = crate::http::metrics_service(self.state.clone());
            let mut stopped = metrics_stopped.clone();
            tokio::spawn(async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.changed().await;
                    })
                    .await;
            })
        });
        let result = match self.listener {
            Some(listener) => {
                axum::serve(listener, tower::make::Shared::new(self.service))
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            None => {
                shutdown.await;
                Ok(())
            }
        };
        let _ = self.stop.send(true);
        let _ = stop_metrics.send(true);
        if let Some(m) = metrics {
            let _ = m.await;
        }
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

/// A pepper or signing key generated at this start (embedded mode) next to a store that
/// already holds events means the old one was lost: every key would stop verifying, or the
/// log's signatures change key. Refuse to start, and say so.
async fn refuse_new_secrets_for_an_old_store(
    settings: &Settings,
    store: &Store,
) -> anyhow::Result<()> {
    if settings.generated.is_empty() || store.account_heads().await?.is_empty() {
        return Ok(());
    }
    let Storage::Embedded { data_dir } = &settings.storage else {
        return Ok(());
    };
    let files = DataFiles::in_dir(data_dir);
    // The fresh files are removed so the next start does not take them for the old ones.
    for (what, path) in [
        ("pepper", &files.pepper),
        ("signing key", &files.signing_key),
    ] {
        if settings.generated.contains(&what) {
            let _ = std::fs::remove_file(path);
        }
    }
    anyhow::bail!(
        "the store {} holds events but its {} {} missing: restore {} from your backup (or set \
         KEYLEDGER_PEPPER / KEYLEDGER_SIGNING_KEY); a new one would make every existing key \
         unknown or change the key that signs the log",
        files.database.display(),
        settings.generated.join(" and "),
        if settings.generated.len() == 1 {
            "is"
        } else {
            "are"
        },
        settings
            .generated
            .iter()
            .map(|w| match *w {
                "pepper" => files.pepper.display().to_string(),
                _ => files.signing_key.display().to_string(),
            })
            .collect::<Vec<_>>()
            .join(" and ")
    )
}

/// The listing table without the bus: current before serving (a first start on an
/// imported history writes it here), then kept by its feed and this process's commits.
async fn catch_up_listing(
    store: &Store,
    source: &Source,
    heads: &[(String, u64)],
) -> anyhow::Result<()> {
    if !matches!(source, Source::Store) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let applied = from_store::catch_up_all(store, &[&ListingTable], heads)
        .await
        .context("cannot bring the listing up to date")?;
    if applied > 0 {
        tracing::info!(
            events = applied,
            seconds = started.elapsed().as_secs_f64(),
            "listing caught up"
        );
    }
    Ok(())
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
