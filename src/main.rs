//! The `keyledger` binary: parses the command line and runs it.

use std::process::ExitCode;

use clap::Parser;
use keyledger::app::{open_store, shutdown_signal, Application};
use keyledger::bus::BusConfig;
use keyledger::cli::{run_keys, BenchWhat, Cli, Commands, LogFormat, ServeArgs};
use keyledger::config::{Inputs, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    keyledger::telemetry::init(matches!(cli.log_format, LogFormat::Json));
    let result = match cli.command {
        Commands::Serve(args) => serve(args).await,
        Commands::Migrate(args) => migrate(args).await,
        Commands::Keys(args) => run_keys(&args.client, args.action).await,
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
        Commands::Bench {
            what: BenchWhat::Commands(a),
        } => {
            let mut bus = BusConfig::new(a.kafka_brokers);
            bus.topic_prefix = a.topic_prefix;
            keyledger::loadgen::run(keyledger::loadgen::LoadSettings {
                database_url: a.database_url,
                bus,
                commands: a.count,
                accounts: a.accounts.max(1),
                raw: a.raw,
            })
            .await
        }
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
    let (settings, token_path) = Settings::resolve(args.inputs())?;
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

async fn migrate(args: keyledger::cli::StorageArgs) -> anyhow::Result<()> {
    let inputs = Inputs {
        data_dir: args.data_dir.clone(),
        database_url: args.database_url.clone(),
        // Migration touches no secret, but resolution wants them in PostgreSQL mode.
        pepper: Some("migration-needs-no-pepper-000000000000".into()),
        api_token: Some("migration-needs-no-token-0000000".into()),
        ..Inputs::default()
    };
    let (settings, _) = Settings::resolve(inputs)?;
    open_store(&settings).await?;
    eprintln!("schema is up to date");
    Ok(())
}
