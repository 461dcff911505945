//! `keyledger-tools`: what measures and breaks keyledger, kept out of the product binary.
//!
//! - `bench commands|http|audit|restart` ([`bench`]): keyledger measured next to the bare
//!   parts it is built on; `scripts/bench-all` runs them all.
//! - `drill` ([`drill`]): the load and the verdict of a fault drill (`drills/`).
//!
//! The synthetic events the benchmarks need (`bench audit` writes them to a topic, `bench
//! restart` straight into an event store, past the aggregate) are made here too
//! ([`bench::synthetic_key`]); the service never writes events that way.

mod bench;
mod drill;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keyledger::kafka::BusConfig;

#[derive(Debug, Parser)]
#[command(
    name = "keyledger-tools",
    version,
    about = "keyledger's load tools: benchmarks and the fault drills' load (not for production)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure a running keyledger next to the bare parts it is built on (docs/PERFORMANCE.md).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// A fault drill's load and verdict (see drills/): commands over the bus, every one
    /// followed to its result, then checked against the store. Exit 1 when a promise broke.
    Drill(DrillArgs),
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// GenerateKey commands over the bus against a running keyledger, next to the raw
    /// database and broker rates.
    Commands(BenchCommandsArgs),
    /// `audit --from kafka` on a fresh topic of synthetic events, next to a bare consumer.
    Audit {
        #[arg(long, env = "KEYLEDGER_KAFKA_BROKERS")]
        kafka_brokers: String,
        /// Events to write and replay.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// Verification over HTTP against a running keyledger, next to a bare endpoint of the
    /// same server (a closed-loop load generator).
    Http {
        #[command(flatten)]
        target: ServerArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// Where the load comes from.
        #[arg(long, value_enum, default_value = "wrk")]
        generator: bench::http::Generator,
        /// Add a phase under a flood of made-up legacy-shaped keys (wrk; the server needs
        /// KEYLEDGER_LEGACY_SALT and a KEYLEDGER_LEGACY_EXPIRY in the future).
        #[arg(long)]
        legacy_flood: bool,
    },
    /// Verification over HTTP with usage counted (`--server`) next to an instance alike
    /// but with KEYLEDGER_USAGE_FLUSH_SECONDS=0 (`--without`), wrk alternating between them.
    Usage {
        #[command(flatten)]
        target: ServerArgs,
        /// The instance that does not count usage.
        #[arg(long)]
        without: String,
        #[command(flatten)]
        load: LoadArgs,
        /// Measurements of each, alternately.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The listing as of an instant, and a key's history, on an account of `--events`
    /// events, next to the plain listing.
    History {
        #[command(flatten)]
        target: ServerArgs,
        #[arg(long, default_value_t = 1000)]
        events: usize,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// `keyledger scan` on plain text next to `grep -c` on the same files.
    Scan {
        #[arg(long, default_value_t = 200)]
        megabytes: usize,
        /// The keyledger binary (default: next to this one).
        #[arg(long)]
        keyledger: Option<PathBuf>,
    },
    /// A revocation on instance A until instance B refuses the key: idle, and under load.
    Revocation {
        #[arg(long)]
        server_a: String,
        #[arg(long)]
        server_b: String,
        #[arg(long, env = "KEYLEDGER_API_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value_t = 200)]
        trials: usize,
    },
    /// Start-to-ready time and memory of `keyledger serve` with a large store, in every
    /// mode: fills an empty store with synthetic keys and starts the service on it.
    Restart {
        /// An empty PostgreSQL database (it is migrated and filled).
        #[arg(long, env = "KEYLEDGER_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Also start with the bus on (index follower from the end of the events topic).
        #[arg(long, env = "KEYLEDGER_KAFKA_BROKERS")]
        kafka_brokers: Option<String>,
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
        /// The keyledger binary (default: `keyledger` next to this one).
        #[arg(long)]
        keyledger: Option<PathBuf>,
        /// Only these modes (postgres, bus, embedded; repeatable). All by default.
        #[arg(long = "mode")]
        modes: Vec<String>,
    },
}

/// A running keyledger and a token for it.
#[derive(Debug, Clone, Args)]
struct ServerArgs {
    /// The running keyledger.
    #[arg(
        long,
        env = "KEYLEDGER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    #[arg(long, env = "KEYLEDGER_API_TOKEN", hide_env_values = true)]
    token: String,
}

/// How much verification load an HTTP benchmark puts on the server.
#[derive(Debug, Clone, Args)]
struct LoadArgs {
    /// Keys generated (through the API) and verified in turn.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Concurrent connections, each one request at a time.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds measured per phase (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

impl LoadArgs {
    fn settings(self, target: ServerArgs) -> bench::http::HttpSettings {
        bench::http::HttpSettings::new(
            &target.server,
            target.token,
            self.keys,
            self.connections,
            self.seconds,
        )
    }
}

/// A running keyledger's PostgreSQL and Kafka, for the load tools.
#[derive(Debug, Clone, Args)]
struct TargetArgs {
    /// The PostgreSQL of the running keyledger.
    #[arg(long, env = "KEYLEDGER_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The Kafka of the running keyledger.
    #[arg(long, env = "KEYLEDGER_KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "KEYLEDGER_TOPIC_PREFIX", default_value = "keyledger.")]
    topic_prefix: String,
    /// Extra librdkafka settings `key=value`, as the service's `KEYLEDGER_KAFKA_OPTIONS`.
    #[arg(
        long = "kafka-option",
        env = "KEYLEDGER_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    kafka_options: Vec<String>,
}

impl TargetArgs {
    /// The bus configuration of the target (its brokers and topic prefix).
    fn bus(&self) -> anyhow::Result<BusConfig> {
        let mut bus = BusConfig::new(self.kafka_brokers.clone());
        bus.topic_prefix = self.topic_prefix.clone();
        Ok(bus.with_overrides(keyledger::kafka::parse_options(&self.kafka_options)?)?)
    }
}

#[derive(Debug, Clone, Args)]
struct DrillArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Commands to send.
    #[arg(long, default_value_t = 10_000)]
    commands: usize,
    /// Accounts they are spread over (at most 50 keys each).
    #[arg(long, default_value_t = 400)]
    accounts: usize,
    /// Commands per second.
    #[arg(long, default_value_t = 400.0)]
    rate: f64,
    /// Seconds to wait for every result before giving up.
    #[arg(long, default_value_t = 600)]
    deadline_seconds: u64,
    /// Seconds without a result before a command is sent again.
    #[arg(long, default_value_t = 30)]
    resend_after_seconds: u64,
}

#[derive(Debug, Clone, Args)]
struct BenchCommandsArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// GenerateKey commands at full speed (half as many again, paced).
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Accounts they are spread over.
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Raw database commits measured (four times as many broker records).
    #[arg(long, default_value_t = 2000)]
    raw: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    keyledger::telemetry::init(false);
    let result = match cli.command {
        Command::Drill(a) => match drill(a).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Bench { what } => bench(what).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(what: BenchWhat) -> anyhow::Result<()> {
    match what {
        BenchWhat::Audit {
            kafka_brokers,
            events,
        } => bench::bus::audit_bench(&kafka_brokers, events).await,
        BenchWhat::Http {
            target,
            load,
            generator,
            legacy_flood,
        } => bench::http::run(bench::http::HttpSettings {
            generator,
            legacy_flood,
            ..load.settings(target)
        })
        .await
        .map(|_| ()),
        BenchWhat::Usage {
            target,
            without,
            load,
            rounds,
        } => bench::http::usage(load.settings(target), without, rounds)
            .await
            .map(|_| ()),
        BenchWhat::History {
            target: ServerArgs { server, token },
            events,
            samples,
        } => bench::history::history(&server, &token, events.max(1), samples.max(1)).await,
        BenchWhat::Scan {
            megabytes,
            keyledger,
        } => {
            let binary = match keyledger {
                Some(path) => path,
                None => std::env::current_exe()?.with_file_name("keyledger"),
            };
            bench::scan::run(&binary, megabytes)
        }
        BenchWhat::Revocation {
            server_a,
            server_b,
            token,
            trials,
        } => bench::history::revocation(&server_a, &server_b, &token, trials.max(1)).await,
        BenchWhat::Restart {
            database_url,
            kafka_brokers,
            keys,
            keyledger,
            modes,
        } => {
            let binary = match keyledger {
                Some(path) => path,
                None => std::env::current_exe()?.with_file_name("keyledger"),
            };
            anyhow::ensure!(
                binary.exists(),
                "no keyledger binary at {} (build it, or pass --keyledger)",
                binary.display()
            );
            bench::restart::run(bench::restart::RestartSettings {
                database_url,
                kafka_brokers,
                keys,
                binary,
                modes,
            })
            .await
            .map(|_| ())
        }
        BenchWhat::Commands(a) => {
            bench::bus::run(bench::bus::LoadSettings {
                bus: a.target.bus()?,
                database_url: a.target.database_url,
                commands: a.count,
                accounts: a.accounts.max(1),
                raw: a.raw,
            })
            .await
        }
    }
}

async fn drill(a: DrillArgs) -> anyhow::Result<bool> {
    let (report, pass) = drill::load(drill::DrillSettings {
        bus: a.target.bus()?,
        database_url: a.target.database_url,
        commands: a.commands,
        accounts: a.accounts.max(1),
        rate: a.rate,
        deadline: std::time::Duration::from_secs(a.deadline_seconds),
        resend_after: std::time::Duration::from_secs(a.resend_after_seconds.max(1)),
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(pass)
}
