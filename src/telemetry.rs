//! Logs: `tracing`, human-readable by default, JSON with `KEYLEDGER_LOG_FORMAT=json`,
//! filtered by `RUST_LOG` (default `info`). Nothing logged ever holds a key.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
