//! The `keyledger` binary: parses the command line and runs it.

use std::process::ExitCode;

use clap::Parser;
use keyledger::app::{open_store, shutdown_signal, Application};
use keyledger::cli::{run_keys, run_reminders, Cli, Commands, LogFormat, ServeArgs};
use keyledger::config::{Inputs, Settings};
use keyledger::kafka::BusConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    keyledger::telemetry::init(matches!(cli.log_format, LogFormat::Json));
    let result = match cli.command {
        Commands::Serve(args) => serve(*args).await,
        Commands::Migrate(args) => migrate(args).await,
        Commands::Keys(args) => run_keys(&args.client, args.action).await,
        Commands::Reminders(args) => run_reminders(&args.client, args.action).await,
        Commands::Tokens(args) => tokens(args),
        Commands::Scan {
            paths,
            git,
            json,
            report,
            source,
            client,
        } => match keyledger::cli::scan::run(
            &paths,
            git,
            json,
            report.then_some(keyledger::cli::scan::ReportTo { client, source }),
        )
        .await
        {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        },
        Commands::Audit(args) => match audit(args).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Commands::MigrateLegacy {
            client,
            input,
            dry_run,
            concurrency,
            json,
        } => match keyledger::cli::legacy::run(&client, &input, dry_run, concurrency, json).await {
            Ok(report) if !report.rejected.is_empty() => return ExitCode::from(3),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (settings, token_path) = Settings::resolve(args.inputs()?)?;
    let mode = if args.storage.database_url.is_some() {
        "postgresql"
    } else {
        "embedded"
    };
    let roles = settings.roles;
    let bus = settings.bus.is_some();
    let app = Application::build(settings).await?;
    if let Some(path) = token_path {
        eprintln!(
            "keyledger (embedded, data in {}) — API token in {}",
            args.storage.data_dir.display(),
            path.display()
        );
    }
    match app.local_addr() {
        Ok(addr) => tracing::info!(%addr, mode, bus, ?roles, "keyledger listening"),
        Err(_) => tracing::info!(mode, bus, ?roles, "keyledger running (no HTTP)"),
    }
    app.run_until(shutdown_signal()).await?;
    Ok(())
}

/// Runs an audit; prints the report; returns whether it passed.
async fn audit(args: keyledger::cli::AuditArgs) -> anyhow::Result<bool> {
    use keyledger::audit::{conclude, from_kafka, from_store, human, AuditOptions};
    use keyledger::cli::AuditSource;
    use keyledger::store::Store;
    let opts = AuditOptions {
        account: args.account.clone(),
        until: args.until,
        validity_months: args.key_validity_months,
        print_listing: args.print_listing,
        public_key: keyledger_events::signature::LogKeys::from_base64(&args.public_key)
            .map_err(|e| anyhow::anyhow!("--public-key: {e}"))?,
    };
    // The live store (never migrated by an audit), when one is reachable.
    let store = match (&args.storage.database_url, args.from) {
        (Some(url), _) => Some(Store::connect_postgres(url, 4).await?),
        (None, AuditSource::Store) => {
            let path = keyledger::config::DataFiles::in_dir(&args.storage.data_dir).database;
            anyhow::ensure!(
                path.exists(),
                "no event store at {} (set KEYLEDGER_DATABASE_URL or --data-dir)",
                path.display()
            );
            Some(Store::open_sqlite(&path).await?)
        }
        (None, AuditSource::Kafka) => None,
    };
    let started = std::time::Instant::now();
    let (auditor, source) = match args.from {
        AuditSource::Store => {
            let store = store
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no event store"))?;
            (from_store(store, opts).await?, "store".to_owned())
        }
        AuditSource::Kafka => {
            let brokers = args
                .kafka_brokers
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--from kafka needs KEYLEDGER_KAFKA_BROKERS"))?;
            let mut bus = BusConfig::new(brokers);
            bus.topic_prefix = args.topic_prefix.clone();
            let source = format!("kafka ({})", bus.events_topic());
            (
                tokio::task::spawn_blocking(move || from_kafka(&bus, opts)).await??,
                source,
            )
        }
    };
    let report = conclude(auditor, &source, started, store.as_ref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", human(&report));
    }
    Ok(report.passed)
}

/// `keyledger tokens add|list|revoke`.
fn tokens(args: keyledger::cli::TokensArgs) -> anyhow::Result<()> {
    use keyledger::cli::TokensAction;
    match args.action {
        TokensAction::Add { name, role } => {
            let token = keyledger::tokens::add(&args.file, &name, role)?;
            eprintln!(
                "token '{name}' ({}) added to {}; it is shown once, here:",
                role.as_str(),
                args.file.display()
            );
            println!("{token}");
        }
        TokensAction::List => {
            for e in keyledger::tokens::read_file(&args.file)? {
                println!(
                    "{:<24} {:<9} blake3 {}…",
                    e.name,
                    e.role.as_str(),
                    &e.hash.to_hex()[..12]
                );
            }
        }
        TokensAction::Revoke { name } => {
            keyledger::tokens::revoke(&args.file, &name)?;
            eprintln!("token '{name}' removed from {}", args.file.display());
        }
    }
    Ok(())
}

async fn migrate(args: keyledger::cli::StorageArgs) -> anyhow::Result<()> {
    let inputs = Inputs {
        data_dir: args.data_dir.clone(),
        database_url: args.database_url.clone(),
        // Migration touches no secret, but resolution wants them in PostgreSQL mode.
        pepper: Some("migration-needs-no-pepper-000000000000".into()),
        api_token: Some("migration-needs-no-token-0000000".into()),
        signing_key: Some(keyledger::domain::LogSigner::generate_seed()),
        ..Inputs::default()
    };
    let (settings, _) = Settings::resolve(inputs)?;
    open_store(&settings).await?;
    eprintln!("schema is up to date");
    Ok(())
}
