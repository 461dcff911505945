//! The operator's command line: `serve` and `migrate` run the service and its schema;
//! `keys`, `reminders` and `migrate-legacy` are clients of a running server's HTTP API (one
//! writer path); `audit` replays the log; `scan` looks for leaked keys in files and git
//! history. Load tools are `keyledger-tools`, not here.

mod client;
pub mod legacy;
pub mod scan;
pub mod table;

use std::path::PathBuf;

use chrono::{DateTime, Duration, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Inputs, ReminderSettings, Roles};
use crate::domain::Policy;
use crate::kafka::BusConfig;
use crate::notify::dispatch::Smtp;
use crate::notify::render::Templates;
use crate::reminders::schedule::Stages;

pub use client::{run_keys, run_reminders};

#[derive(Debug, Parser)]
#[command(
    name = "keyledger",
    version,
    about = "Event-sourced lifecycle of API keys: generate, list, rotate, revoke, expire, migrate, verify."
)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(
        long,
        global = true,
        env = "KEYLEDGER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the service (HTTP API). Embedded SQLite under ./data unless KEYLEDGER_DATABASE_URL is set.
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    Migrate(StorageArgs),
    /// Manage keys through a running server's HTTP API.
    Keys(KeysArgs),
    /// Migrate every legacy key of an export (CSV or JSON lines) through a running server.
    MigrateLegacy {
        #[command(flatten)]
        client: ClientArgs,
        /// CSV `account_id,login_email,legacy_hash[,created_at]` (header optional) or JSON lines.
        #[arg(long)]
        input: PathBuf,
        /// Validate every row; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rows in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay the whole log and prove what happened to every key (exit 1 on any failure).
    Audit(AuditArgs),
    /// Scoped API tokens: add, list, revoke (the file the server re-reads on change).
    Tokens(TokensArgs),
    /// The reminder saga's schedule, through a running server's HTTP API.
    Reminders(RemindersArgs),
    /// Find key-shaped strings in files, folders and (--git) history; prints where and the
    /// last five characters, never a key; exit 1 when any is found.
    Scan {
        /// Files or folders (`.git` folders are skipped; use --git for the history).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also every commit of the repository at each path (keys since deleted too).
        #[arg(long)]
        git: bool,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Submit every key found to a running keyledger's POST /v1/leaks (a reporter
        /// token): live keys are revoked at once and their contacts told.
        #[arg(long)]
        report: bool,
        /// With --report: where the keys were found, said before each key's file:line
        /// (e.g. the repository's URL).
        #[arg(long, default_value = "")]
        source: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AuditSource {
    /// The events topic, read from the beginning outside any consumer group.
    Kafka,
    /// The event store (PostgreSQL, or the embedded SQLite file).
    Store,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Where to read the log from.
    #[arg(long, value_enum, default_value = "store")]
    pub from: AuditSource,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Kafka bootstrap servers (for `--from kafka`).
    #[arg(long, env = "KEYLEDGER_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    #[arg(long, env = "KEYLEDGER_TOPIC_PREFIX", default_value = "keyledger.")]
    pub topic_prefix: String,
    /// Audit one account only.
    #[arg(long)]
    pub account: Option<String>,
    /// Replay up to this instant (RFC 3339): the state as of then (not compared with live).
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Include the rebuilt listing in the JSON report.
    #[arg(long)]
    pub print_listing: bool,
    /// The configured key validity, for the expiry invariant.
    #[arg(long, env = "KEYLEDGER_KEY_VALIDITY_MONTHS", default_value_t = 6)]
    pub key_validity_months: u32,
    /// The log's public key (base64, as `GET /v1/log-key` serves it): every account's
    /// history must carry a valid signature. Nothing secret is needed. Repeat it for the
    /// keys of a rotated signing key (`previous_public_keys`), the current one first.
    #[arg(long)]
    pub public_key: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// PostgreSQL URL; when set, keyledger runs in production mode on PostgreSQL.
    #[arg(long, env = "KEYLEDGER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Folder of the embedded mode (SQLite store, generated token and pepper).
    #[arg(long, env = "KEYLEDGER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// HTTP listen address.
    #[arg(long, env = "KEYLEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Scoped API tokens (TOML of name, role, BLAKE3 hash; `keyledger tokens add`): re-read
    /// on SIGHUP and when it changes. The secrets themselves — KEYLEDGER_PEPPER,
    /// KEYLEDGER_API_TOKEN (an admin token), KEYLEDGER_SIGNING_KEY — are read from the
    /// environment only: a flag would show them in the process list.
    #[arg(long, env = "KEYLEDGER_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Public keys (base64, comma-separated) of signing keys used before the current one:
    /// events they signed stay vouched for after a rotation of KEYLEDGER_SIGNING_KEY.
    #[arg(long, env = "KEYLEDGER_PREVIOUS_LOG_KEYS", value_delimiter = ',')]
    pub previous_log_keys: Vec<String>,
    /// A listener of its own for `/metrics` (then not served on the API's port).
    #[arg(long, env = "KEYLEDGER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Calendar months a key is valid for.
    #[arg(long, env = "KEYLEDGER_KEY_VALIDITY_MONTHS", default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=24))]
    pub key_validity_months: u32,
    /// Live keys an account may hold.
    #[arg(long, env = "KEYLEDGER_MAX_LIVE_KEYS", default_value_t = 50)]
    pub max_live_keys: usize,
    /// Default grace of a rotated key, in seconds.
    #[arg(
        long,
        env = "KEYLEDGER_ROTATION_GRACE_SECONDS",
        default_value_t = 86_400
    )]
    pub rotation_grace_seconds: i64,
    /// Postman's fixed bcrypt salt (`$2b$10$…`, 29 characters): lets migrated legacy keys
    /// verify through Postman's scheme until their expiry.
    #[arg(long, env = "KEYLEDGER_LEGACY_SALT", hide_env_values = true)]
    pub legacy_salt: Option<String>,
    /// At most this many bcrypt checks of legacy keys a second (one at a time).
    #[arg(
        long,
        env = "KEYLEDGER_LEGACY_CHECKS_PER_SECOND",
        default_value_t = 4.0
    )]
    pub legacy_checks_per_second: f64,
    /// How often each instance adds the verifications it counted to the usage table
    /// (0: usage is not counted; only to measure what counting costs).
    #[arg(long, env = "KEYLEDGER_USAGE_FLUSH_SECONDS", default_value_t = 5.0)]
    pub usage_flush_seconds: f64,
    /// Fixed expiry of migrated legacy keys (RFC 3339).
    #[arg(
        long,
        env = "KEYLEDGER_LEGACY_EXPIRY",
        default_value = "2024-04-21T00:00:00Z"
    )]
    pub legacy_expiry: DateTime<Utc>,
    /// The service's default from address, always allowed as a sender.
    #[arg(long, env = "KEYLEDGER_DEFAULT_FROM")]
    pub default_from: Option<String>,
    /// Size of the PostgreSQL connection pool.
    #[arg(long, env = "KEYLEDGER_DB_CONNECTIONS", default_value_t = 16)]
    pub db_connections: u32,
    /// Kafka bootstrap servers; set ⇒ the bus is on (needs PostgreSQL).
    #[arg(long, env = "KEYLEDGER_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Prefix of every topic name.
    #[arg(long, env = "KEYLEDGER_TOPIC_PREFIX", default_value = "keyledger.")]
    pub topic_prefix: String,
    /// Partitions of the topics keyledger creates.
    #[arg(long, env = "KEYLEDGER_KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics keyledger creates (the events topic gets
    /// min.insync.replicas = min(2, this)).
    #[arg(long, env = "KEYLEDGER_KAFKA_REPLICATION", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub kafka_replication: i32,
    /// Retention of the commands, command-results and notifications topics keyledger
    /// creates, in milliseconds (the events topic keeps everything, always).
    #[arg(long, env = "KEYLEDGER_KAFKA_RETENTION_MS", default_value_t = crate::kafka::DEFAULT_RETENTION_MS, value_parser = clap::value_parser!(i64).range(60_000..))]
    pub kafka_retention_ms: i64,
    /// Retention of the dead-letters topic keyledger creates, in milliseconds.
    #[arg(long, env = "KEYLEDGER_KAFKA_DEAD_LETTER_RETENTION_MS", default_value_t = crate::kafka::DEFAULT_DEAD_LETTER_RETENTION_MS, value_parser = clap::value_parser!(i64).range(60_000..))]
    pub kafka_dead_letter_retention_ms: i64,
    /// An extra librdkafka setting `key=value` for every client (repeatable; the
    /// environment variable takes a comma-separated list). The delivery and offset settings
    /// keyledger relies on (idempotence, acks, offset reset and commits) cannot be changed.
    #[arg(
        long = "kafka-option",
        env = "KEYLEDGER_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka_options: Vec<String>,
    /// How the Kafka clients connect: plaintext, ssl, sasl_plaintext or sasl_ssl. With SASL,
    /// the password comes from KEYLEDGER_KAFKA_SASL_PASSWORD (environment only); a TLS
    /// client key's password from KEYLEDGER_KAFKA_SSL_KEY_PASSWORD.
    #[arg(
        long,
        env = "KEYLEDGER_KAFKA_SECURITY_PROTOCOL",
        default_value = "plaintext"
    )]
    pub kafka_security_protocol: crate::kafka::security::Protocol,
    /// SASL mechanism: SCRAM-SHA-512, SCRAM-SHA-256, or PLAIN (only with sasl_ssl).
    #[arg(
        long,
        env = "KEYLEDGER_KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512"
    )]
    pub kafka_sasl_mechanism: crate::kafka::security::Mechanism,
    /// SASL user name (the Kafka principal; see docs/OPERATIONS.md for its ACLs).
    #[arg(long, env = "KEYLEDGER_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// PEM file of the CA that signs the brokers' certificates (TLS).
    #[arg(long, env = "KEYLEDGER_KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<PathBuf>,
    /// PEM client certificate, for brokers that require mutual TLS.
    #[arg(long, env = "KEYLEDGER_KAFKA_SSL_CERTIFICATE_LOCATION")]
    pub kafka_ssl_certificate_location: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "KEYLEDGER_KAFKA_SSL_KEY_LOCATION")]
    pub kafka_ssl_key_location: Option<PathBuf>,
    /// Most outbox rows the relay publishes per batch.
    #[arg(long, env = "KEYLEDGER_RELAY_BATCH", default_value_t = 1000)]
    pub relay_batch: i64,
    /// Most records the projector applies per transaction.
    #[arg(long, env = "KEYLEDGER_PROJECTOR_BATCH", default_value_t = 500)]
    pub projector_batch: usize,
    /// Largest command envelope accepted from the bus, in bytes.
    #[arg(long, env = "KEYLEDGER_MAX_COMMAND_BYTES", default_value_t = 1024 * 1024)]
    pub max_command_bytes: usize,
    /// The parts to run: `all`, or a comma-separated list of http, commands, relay,
    /// projector (the last three need the bus).
    #[arg(long, env = "KEYLEDGER_ROLES", default_value = "all", value_parser = Roles::parse)]
    pub role: Roles,
    /// Days before expiry a reminder is sent, comma-separated.
    #[arg(long, env = "KEYLEDGER_REMINDER_STAGES", default_value = "28,14,3,1", value_parser = Stages::parse)]
    pub reminder_stages: Stages,
    /// How often the reminder saga looks for due stages, in milliseconds.
    #[arg(long, env = "KEYLEDGER_REMINDER_TICK_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..))]
    pub reminder_tick_ms: u64,
    /// A folder holding reminder.txt, last-reminder.txt and expired.txt, replacing the
    /// built-in email templates.
    #[arg(long, env = "KEYLEDGER_TEMPLATE_DIR")]
    pub template_dir: Option<PathBuf>,
    /// The mail server for reminders, e.g. `smtp://host:25`, `smtps://user:pass@host:465`,
    /// `smtp://host:587?tls=required`. Unset: no email is sent (the notifications topic
    /// still carries every notification).
    #[arg(long, env = "KEYLEDGER_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,
    /// The sender of reminder emails.
    #[arg(
        long,
        env = "KEYLEDGER_SMTP_FROM",
        default_value = "Postman <donotreply@mail.postman.gov.sg>"
    )]
    pub smtp_from: String,
    /// First retry delay after a failed delivery, in milliseconds (doubled per attempt).
    #[arg(long, env = "KEYLEDGER_SMTP_RETRY_MS", default_value_t = 1000)]
    pub smtp_retry_ms: u64,
    /// Longest delay between two delivery attempts, in milliseconds.
    #[arg(long, env = "KEYLEDGER_SMTP_RETRY_MAX_MS", default_value_t = 600_000)]
    pub smtp_retry_max_ms: u64,
}

impl ServeArgs {
    pub fn inputs(&self) -> anyhow::Result<Inputs> {
        let defaults = Policy::default();
        let templates = match &self.template_dir {
            Some(dir) => Templates::from_dir(dir)
                .map_err(|e| anyhow::anyhow!("KEYLEDGER_TEMPLATE_DIR: {e}"))?,
            None => Templates::builtin(),
        };
        let smtp = self
            .smtp_url
            .as_deref()
            .map(|url| {
                Smtp::new(
                    url,
                    &self.smtp_from,
                    std::time::Duration::from_millis(self.smtp_retry_ms.max(1)),
                    std::time::Duration::from_millis(self.smtp_retry_max_ms.max(1)),
                )
            })
            .transpose()?;
        Ok(Inputs {
            listen: self.listen.clone(),
            data_dir: self.storage.data_dir.clone(),
            database_url: self.storage.database_url.clone(),
            pepper: secret_env("KEYLEDGER_PEPPER"),
            api_token: secret_env("KEYLEDGER_API_TOKEN"),
            tokens_file: self.tokens_file.clone(),
            signing_key: secret_env("KEYLEDGER_SIGNING_KEY"),
            previous_log_keys: self.previous_log_keys.clone(),
            metrics_listen: self.metrics_listen.clone(),
            policy: Policy {
                validity_months: self.key_validity_months,
                max_live_keys: self.max_live_keys,
                default_grace: Duration::seconds(self.rotation_grace_seconds.max(0))
                    .min(defaults.max_grace),
                max_grace: defaults.max_grace,
                legacy_expiry: self.legacy_expiry,
                reminder_stages: self.reminder_stages.days().to_vec(),
            },
            default_from: self.default_from.clone(),
            max_db_connections: self.db_connections,
            legacy_salt: self.legacy_salt.clone(),
            legacy_checks_per_second: self.legacy_checks_per_second,
            usage_flush: Some(match self.usage_flush_seconds {
                s if !s.is_finite() || s < 0.0 => anyhow::bail!(
                    "KEYLEDGER_USAGE_FLUSH_SECONDS must be 0 (usage not counted) or a number of seconds, not {s}"
                ),
                0.0 => std::time::Duration::ZERO,
                s => std::time::Duration::from_secs_f64(s.clamp(0.05, 3600.0)),
            }),
            bus: self
                .kafka_brokers
                .as_ref()
                .map(|brokers| -> anyhow::Result<BusConfig> {
                    let mut bus = BusConfig::new(brokers.clone());
                    bus.topic_prefix = self.topic_prefix.clone();
                    bus.partitions = self.kafka_partitions.max(1);
                    bus.replication = self.kafka_replication.max(1);
                    bus.retention_ms = self.kafka_retention_ms;
                    bus.dead_letter_retention_ms = self.kafka_dead_letter_retention_ms;
                    bus.max_command_bytes = self.max_command_bytes;
                    bus.relay_batch = self.relay_batch;
                    bus.projector_batch = self.projector_batch;
                    bus.security = self.kafka_security()?;
                    Ok(bus.with_overrides(crate::kafka::parse_options(&self.kafka_options)?)?)
                })
                .transpose()?,
            roles: self.role,
            reminders: ReminderSettings {
                stages: self.reminder_stages.clone(),
                tick: std::time::Duration::from_millis(self.reminder_tick_ms),
                templates,
                smtp,
                ..ReminderSettings::default()
            },
        })
    }
}

impl ServeArgs {
    /// The Kafka security settings, the secrets read from the environment.
    fn kafka_security(&self) -> anyhow::Result<crate::kafka::security::Security> {
        use crate::kafka::security::{Sasl, Security, Tls};
        let password = secret_env("KEYLEDGER_KAFKA_SASL_PASSWORD");
        let sasl = match (&self.kafka_sasl_username, password) {
            (Some(username), Some(password)) => Some(Sasl {
                mechanism: self.kafka_sasl_mechanism,
                username: username.clone(),
                password: crate::domain::SecretString::new(password),
            }),
            (None, None) => None,
            (Some(_), None) => anyhow::bail!(
                "KEYLEDGER_KAFKA_SASL_USERNAME is set but KEYLEDGER_KAFKA_SASL_PASSWORD is not"
            ),
            (None, Some(_)) => anyhow::bail!(
                "KEYLEDGER_KAFKA_SASL_PASSWORD is set but KEYLEDGER_KAFKA_SASL_USERNAME is not"
            ),
        };
        let security = Security {
            protocol: self.kafka_security_protocol,
            sasl,
            tls: Tls {
                ca_location: self.kafka_ssl_ca_location.clone(),
                certificate_location: self.kafka_ssl_certificate_location.clone(),
                key_location: self.kafka_ssl_key_location.clone(),
                key_password: secret_env("KEYLEDGER_KAFKA_SSL_KEY_PASSWORD")
                    .map(crate::domain::SecretString::new),
            },
        };
        security.validate()?;
        Ok(security)
    }
}

/// A secret from the environment (never a flag: flags show in the process list).
fn secret_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of a running keyledger.
    #[arg(
        long,
        env = "KEYLEDGER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// A file holding the bearer token. Without it, KEYLEDGER_API_TOKEN from the
    /// environment, else the embedded server's generated token in the data folder. (Never
    /// the token itself as a flag: it would show in the process list.)
    #[arg(long, env = "KEYLEDGER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where to find an embedded server's generated token.
    #[arg(long, env = "KEYLEDGER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

impl ClientArgs {
    /// The bearer token: `--token-file`, else `KEYLEDGER_API_TOKEN`, else the embedded
    /// server's generated token.
    pub fn token(&self) -> anyhow::Result<String> {
        use anyhow::Context;
        if let Some(path) = &self.token_file {
            return std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .with_context(|| format!("cannot read the token file {}", path.display()));
        }
        if let Some(t) = secret_env("KEYLEDGER_API_TOKEN") {
            return Ok(t);
        }
        let path = crate::config::DataFiles::in_dir(&self.data_dir).api_token;
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .with_context(|| {
                format!(
                    "no --token-file or KEYLEDGER_API_TOKEN, and no token file at {}",
                    path.display()
                )
            })
    }
}

#[derive(Debug, Args)]
pub struct TokensArgs {
    /// The tokens file.
    #[arg(long, env = "KEYLEDGER_TOKENS_FILE")]
    pub file: PathBuf,
    #[command(subcommand)]
    pub action: TokensAction,
}

#[derive(Debug, Subcommand)]
pub enum TokensAction {
    /// Make a token: prints it once (only its hash is kept) and adds it to the file.
    Add {
        /// Its name, recorded as the actor of every command it issues.
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: crate::tokens::Role,
    },
    /// The tokens in the file: name, role, the start of the hash.
    List,
    /// Remove a token: it stops working within a second on every running server.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct RemindersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: RemindersAction,
}

#[derive(Debug, Subcommand)]
pub enum RemindersAction {
    /// The reminders and expiries ahead: key, stage, due time, recipients.
    List {
        /// Only this account's keys.
        #[arg(long)]
        account: Option<String>,
        /// How many days ahead to look.
        #[arg(long, default_value_t = 30)]
        days: i64,
        /// Print the JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Generate a key; prints it once (it cannot be shown again).
    Generate {
        #[arg(long)]
        account: String,
        /// Permanent, unique in the account, at most 255 characters.
        #[arg(long)]
        label: String,
        /// A contact email (repeat for more, 1 to 20).
        #[arg(long = "contact", required = true)]
        contacts: Vec<String>,
        /// The account owner's login email (its local part becomes the key prefix).
        #[arg(long)]
        login_email: String,
    },
    /// List an account's keys (the Settings page).
    List {
        #[arg(long)]
        account: String,
        /// Revoked keys too (with when and why).
        #[arg(long)]
        include_inactive: bool,
        /// The listing as it stood at this instant (RFC 3339), folded from the log.
        #[arg(long)]
        as_of: Option<String>,
        /// Only keys not verified for this many days (never verified included).
        #[arg(long, value_name = "DAYS")]
        unused_for: Option<u32>,
        /// Print the API's JSON (what scripts read; also the default when the output is
        /// not a terminal).
        #[arg(long, conflicts_with = "table")]
        json: bool,
        /// Print the table even when the output is not a terminal.
        #[arg(long)]
        table: bool,
    },
    /// Every event of one key, as a timeline (or JSON, or an SVG picture).
    History {
        #[arg(long)]
        account: String,
        #[arg(long)]
        key_id: String,
        /// Print the API's JSON instead of the timeline.
        #[arg(long)]
        json: bool,
        /// Write the timeline as an SVG picture to this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
    },
    /// Replace a key's contact emails.
    Contacts {
        #[arg(long)]
        account: String,
        #[arg(long)]
        key_id: String,
        #[arg(long = "contact", required = true)]
        contacts: Vec<String>,
    },
    /// Revoke a key, at once and for good.
    Revoke {
        #[arg(long)]
        account: String,
        #[arg(long)]
        key_id: String,
    },
    /// Issue a successor with a new label; the old key keeps working for the grace period.
    Rotate {
        #[arg(long)]
        account: String,
        #[arg(long)]
        key_id: String,
        #[arg(long)]
        label: String,
        #[arg(long)]
        grace_seconds: Option<i64>,
        /// Revoke the old key as soon as the new one is first verified (the grace is the
        /// latest end).
        #[arg(long)]
        revoke_old_on_first_use: bool,
    },
    /// Verify a key read from standard input (so it stays out of shell history).
    Verify {
        /// A from address to check against the custom-from-address rule.
        #[arg(long)]
        from: Option<String>,
    },
    /// Bring over an account's legacy key.
    MigrateLegacy {
        #[arg(long)]
        account: String,
        #[arg(long)]
        login_email: String,
        #[arg(long)]
        legacy_hash: String,
        #[arg(long)]
        created_at: Option<DateTime<Utc>>,
    },
}
