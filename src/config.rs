//! Configuration: where the data lives, the secrets, the rules.
//!
//! With nothing configured keyledger runs embedded: a SQLite file, a generated pepper and a
//! generated API token under the data directory (files created with mode 0600). With
//! `KEYLEDGER_DATABASE_URL` it runs on PostgreSQL, and then the pepper and the token must
//! be configured: a missing secret is a start-up error, never a silent default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;

use std::time::Duration;

use crate::domain::{Clock, Policy, SecretString, SystemClock};
use crate::kafka::BusConfig;
use crate::notify::dispatch::Smtp;
use crate::notify::render::Templates;
use crate::reminders::schedule::Stages;

/// The shortest pepper accepted (bytes).
pub const MIN_PEPPER_BYTES: usize = 32;
/// The shortest API token accepted (bytes).
pub const MIN_TOKEN_BYTES: usize = 24;

#[derive(Debug, Clone)]
pub enum Storage {
    Embedded { data_dir: PathBuf },
    Postgres { url: SecretString },
}

/// How often usage is flushed unless configured (`KEYLEDGER_USAGE_FLUSH_SECONDS`).
pub const DEFAULT_USAGE_FLUSH: Duration = Duration::from_secs(5);

/// Everything the service needs to start.
#[derive(Clone)]
pub struct Settings {
    pub listen: String,
    pub storage: Storage,
    pub pepper: SecretString,
    /// The admin token (`KEYLEDGER_API_TOKEN`); optional when a tokens file is given.
    pub api_token: Option<SecretString>,
    /// Scoped tokens (`KEYLEDGER_TOKENS_FILE`).
    pub tokens_file: Option<PathBuf>,
    /// The base64 Ed25519 seed that signs every event's chain value.
    pub signing_key: SecretString,
    /// Public keys of earlier signing keys (`KEYLEDGER_PREVIOUS_LOG_KEYS`): events they
    /// signed before a rotation stay vouched for.
    pub previous_log_keys: Vec<keyledger_events::signature::LogKey>,
    /// Secrets generated at this start (embedded mode): a store that already holds events
    /// must not meet a new pepper or signing key.
    pub generated: Vec<&'static str>,
    /// A separate listener for `/metrics` (then not served on the API's port).
    pub metrics_listen: Option<String>,
    pub policy: Policy,
    /// The service's default sender address (always allowed as a from address).
    pub default_from: Option<String>,
    pub clock: Arc<dyn Clock>,
    pub max_db_connections: u32,
    /// Postman's fixed bcrypt salt, to verify migrated legacy keys.
    pub legacy_salt: Option<String>,
    /// At most this many bcrypt checks of legacy keys a second.
    pub legacy_checks_per_second: f64,
    /// The Kafka bus, when configured.
    pub bus: Option<BusConfig>,
    /// The parts this process runs.
    pub roles: Roles,
    /// Reminders, expiry and notifications.
    pub reminders: ReminderSettings,
    /// How often the verifications counted in memory are added to the usage table; None:
    /// usage is not counted at all (`KEYLEDGER_USAGE_FLUSH_SECONDS=0`, for measuring what
    /// counting costs).
    pub usage_flush: Option<Duration>,
}

/// The reminder saga's and the notifier's settings.
#[derive(Clone, Debug)]
pub struct ReminderSettings {
    /// Days before expiry a reminder is sent (28, 14, 3, 1).
    pub stages: Stages,
    /// How often the saga looks for due stages.
    pub tick: Duration,
    pub templates: Templates,
    /// Where emails go; none are sent when unset (the notifications topic still has them).
    pub smtp: Option<Smtp>,
    /// How often the notifier looks at its outbox when idle.
    pub poll: Duration,
}

impl Default for ReminderSettings {
    fn default() -> Self {
        Self {
            stages: Stages::default(),
            tick: Duration::from_secs(5),
            templates: Templates::builtin(),
            smtp: None,
            poll: Duration::from_millis(500),
        }
    }
}

/// The parts of the service a process runs; `all` by default. Each can run alone so they
/// scale separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The HTTP API (and the in-memory verification index it answers from).
    pub http: bool,
    /// The command consumer of the bus.
    pub commands: bool,
    /// The outbox relay.
    pub relay: bool,
    /// The projector (listing table and persisted index from the events topic).
    pub projector: bool,
    /// The reminder saga (schedule, firing reminders and expiries).
    pub saga: bool,
    /// The notifier (notifications topic, SMTP).
    pub notifier: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        http: true,
        commands: true,
        relay: true,
        projector: true,
        saga: true,
        notifier: true,
    };

    const NONE: Roles = Roles {
        http: false,
        commands: false,
        relay: false,
        projector: false,
        saga: false,
        notifier: false,
    };

    /// Parses `all` or a comma-separated list of `http`, `commands`, `relay`, `projector`,
    /// `saga`, `notifier`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut r = Roles::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => r = Roles::ALL,
                "http" => r.http = true,
                "commands" => r.commands = true,
                "relay" => r.relay = true,
                "projector" => r.projector = true,
                "saga" => r.saga = true,
                "notifier" => r.notifier = true,
                other => {
                    return Err(format!(
                        "unknown role '{other}' (all, http, commands, relay, projector, saga, notifier)"
                    ))
                }
            }
        }
        if r == Roles::NONE {
            return Err("no role given".into());
        }
        Ok(r)
    }
}

impl Default for Roles {
    fn default() -> Self {
        Roles::ALL
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("KEYLEDGER_PEPPER must be set when KEYLEDGER_DATABASE_URL is (at least {MIN_PEPPER_BYTES} bytes of secret; e.g. `openssl rand -base64 48`)")]
    MissingPepper,
    #[error("KEYLEDGER_API_TOKEN or KEYLEDGER_TOKENS_FILE must be set when KEYLEDGER_DATABASE_URL is (a token of at least {MIN_TOKEN_BYTES} characters; `keyledger tokens add` makes scoped ones)")]
    MissingToken,
    #[error("KEYLEDGER_SIGNING_KEY must be set when KEYLEDGER_DATABASE_URL is: the base64 of 32 random bytes, e.g. `openssl rand -base64 32`; it signs every event, keep it safe and stable")]
    MissingSigningKey,
    #[error("KEYLEDGER_SIGNING_KEY is not the base64 of 32 bytes")]
    BadSigningKey,
    #[error("KEYLEDGER_PREVIOUS_LOG_KEYS: {0} (the base64 public keys GET /v1/log-key served before the rotation, comma-separated)")]
    BadPreviousLogKey(keyledger_events::signature::LogKeyError),
    #[error("KEYLEDGER_PEPPER is too short: at least {MIN_PEPPER_BYTES} bytes are required")]
    ShortPepper,
    #[error(
        "KEYLEDGER_API_TOKEN is too short: at least {MIN_TOKEN_BYTES} characters are required"
    )]
    ShortToken,
    #[error(
        "the Kafka bus needs PostgreSQL: set KEYLEDGER_DATABASE_URL with KEYLEDGER_KAFKA_BROKERS"
    )]
    BusWithoutPostgres,
    #[error("KEYLEDGER_LEGACY_SALT must be a bcrypt salt: '$2b$' (or $2a$, $2y$), two cost digits, '$', 22 characters of [./A-Za-z0-9]")]
    BadLegacySalt,
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the operator configured (flags and environment), before defaults are resolved.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub listen: String,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub pepper: Option<String>,
    pub api_token: Option<String>,
    pub tokens_file: Option<PathBuf>,
    pub signing_key: Option<String>,
    /// Base64 public keys of earlier signing keys.
    pub previous_log_keys: Vec<String>,
    pub metrics_listen: Option<String>,
    pub policy: Policy,
    pub default_from: Option<String>,
    pub max_db_connections: u32,
    pub legacy_salt: Option<String>,
    /// 0 means the default (4).
    pub legacy_checks_per_second: f64,
    pub bus: Option<BusConfig>,
    pub roles: Roles,
    pub reminders: ReminderSettings,
    /// None means the default (5 s); zero turns usage counting off.
    pub usage_flush: Option<Duration>,
}

/// Where the embedded mode keeps its files.
pub struct DataFiles {
    pub database: PathBuf,
    pub api_token: PathBuf,
    pub pepper: PathBuf,
    pub signing_key: PathBuf,
}

impl DataFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            database: dir.join("keyledger.db"),
            api_token: dir.join("api-token"),
            pepper: dir.join("pepper"),
            signing_key: dir.join("signing-key"),
        }
    }
}

impl Settings {
    /// Resolves the inputs: embedded secrets are read from, or generated into, the data
    /// directory. Returns the settings and, for embedded mode, where the token is.
    pub fn resolve(inputs: Inputs) -> Result<(Self, Option<PathBuf>), ConfigError> {
        if let Some(salt) = &inputs.legacy_salt {
            if !is_bcrypt_salt(salt) {
                return Err(ConfigError::BadLegacySalt);
            }
        }
        if inputs.bus.is_some() && inputs.database_url.is_none() {
            return Err(ConfigError::BusWithoutPostgres);
        }
        let mut generated = Vec::new();
        let (storage, pepper, token, signing_key, token_path) = match inputs.database_url {
            Some(url) => {
                let pepper = inputs.pepper.ok_or(ConfigError::MissingPepper)?;
                if inputs.api_token.is_none() && inputs.tokens_file.is_none() {
                    return Err(ConfigError::MissingToken);
                }
                let signing_key = inputs.signing_key.ok_or(ConfigError::MissingSigningKey)?;
                (
                    Storage::Postgres {
                        url: SecretString::new(url),
                    },
                    pepper,
                    inputs.api_token,
                    signing_key,
                    None,
                )
            }
            None => {
                let dir = inputs.data_dir.clone();
                let io = |source| ConfigError::DataDir {
                    path: dir.clone(),
                    source,
                };
                std::fs::create_dir_all(&dir).map_err(io)?;
                let files = DataFiles::in_dir(&dir);
                let pepper = match inputs.pepper {
                    Some(p) => p,
                    None => {
                        let (p, new) = read_or_generate(&files.pepper, 48).map_err(io)?;
                        if new {
                            generated.push("pepper");
                        }
                        p
                    }
                };
                let signing_key = match inputs.signing_key {
                    Some(k) => k,
                    None => {
                        let (k, new) = read_or_generate_key(&files.signing_key).map_err(io)?;
                        if new {
                            generated.push("signing key");
                        }
                        k
                    }
                };
                let (token, token_path) = match (inputs.api_token, &inputs.tokens_file) {
                    (Some(t), _) => (Some(t), None),
                    (None, Some(_)) => (None, None),
                    (None, None) => (
                        Some(read_or_generate(&files.api_token, 32).map_err(io)?.0),
                        Some(files.api_token),
                    ),
                };
                (
                    Storage::Embedded { data_dir: dir },
                    pepper,
                    token,
                    signing_key,
                    token_path,
                )
            }
        };
        if pepper.len() < MIN_PEPPER_BYTES {
            return Err(ConfigError::ShortPepper);
        }
        if token.as_ref().is_some_and(|t| t.len() < MIN_TOKEN_BYTES) {
            return Err(ConfigError::ShortToken);
        }
        let signing_key = SecretString::new(signing_key);
        crate::domain::LogSigner::from_base64(signing_key.expose())
            .map_err(|_| ConfigError::BadSigningKey)?;
        let settings = Settings {
            listen: inputs.listen,
            storage,
            pepper: SecretString::new(pepper),
            api_token: token.map(SecretString::new),
            tokens_file: inputs.tokens_file,
            signing_key,
            previous_log_keys: inputs
                .previous_log_keys
                .iter()
                .map(|k| keyledger_events::signature::LogKey::from_base64(k))
                .collect::<Result<_, _>>()
                .map_err(ConfigError::BadPreviousLogKey)?,
            generated,
            metrics_listen: inputs.metrics_listen,
            policy: inputs.policy,
            default_from: inputs.default_from,
            clock: Arc::new(SystemClock),
            max_db_connections: inputs.max_db_connections.max(1),
            legacy_salt: inputs.legacy_salt,
            legacy_checks_per_second: if inputs.legacy_checks_per_second > 0.0 {
                inputs.legacy_checks_per_second
            } else {
                4.0
            },
            bus: inputs.bus,
            roles: inputs.roles,
            reminders: inputs.reminders,
            usage_flush: match inputs.usage_flush {
                None => Some(DEFAULT_USAGE_FLUSH),
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
            },
        };
        Ok((settings, token_path))
    }
}

/// `$2b$10$` and 22 characters of bcrypt's base64 alphabet.
fn is_bcrypt_salt(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 29
        && (s.starts_with("$2a$") || s.starts_with("$2b$") || s.starts_with("$2y$"))
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$'
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
}

/// Reads a secret file, or creates it (mode 0600) with `bytes` random bytes, base64url;
/// says whether it was created.
fn read_or_generate(path: &Path, bytes: usize) -> std::io::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(s) => return Ok((s.trim().to_owned(), false)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let mut raw = vec![0u8; bytes];
    OsRng.fill_bytes(&mut raw);
    let secret = URL_SAFE_NO_PAD.encode(&raw);
    write_private(path, &secret)?;
    Ok((secret, true))
}

/// Reads the signing key file, or creates it with a fresh Ed25519 seed (standard base64).
fn read_or_generate_key(path: &Path) -> std::io::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(s) => return Ok((s.trim().to_owned(), false)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let seed = crate::domain::LogSigner::generate_seed();
    write_private(path, &seed)?;
    Ok((seed, true))
}

/// Writes a new file readable by its owner only, and makes it durable (fsync of the file
/// and of its folder) before returning: a secret that vanished in a crash would make every
/// key or signature unverifiable.
#[cfg(unix)]
pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_mode_requires_both_secrets() {
        let inputs = Inputs {
            database_url: Some("postgres://x".into()),
            api_token: Some("t".repeat(32)),
            ..Inputs::default()
        };
        assert!(matches!(
            Settings::resolve(inputs),
            Err(ConfigError::MissingPepper)
        ));
        let inputs = Inputs {
            database_url: Some("postgres://x".into()),
            pepper: Some("p".repeat(32)),
            ..Inputs::default()
        };
        assert!(matches!(
            Settings::resolve(inputs),
            Err(ConfigError::MissingToken)
        ));
    }

    #[test]
    fn the_legacy_salt_must_be_a_bcrypt_salt() {
        assert!(is_bcrypt_salt("$2b$10$abcdefghijklmnopqrstuv"));
        assert!(!is_bcrypt_salt("$2b$10$short"));
        assert!(!is_bcrypt_salt("$3b$10$abcdefghijklmnopqrstuv"));
        let dir = tempfile::tempdir().expect("tempdir");
        let inputs = Inputs {
            data_dir: dir.path().to_path_buf(),
            legacy_salt: Some("salt".into()),
            ..Inputs::default()
        };
        assert!(matches!(
            Settings::resolve(inputs),
            Err(ConfigError::BadLegacySalt)
        ));
    }

    #[cfg(unix)]
    #[test]
    fn embedded_secrets_are_generated_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let inputs = Inputs {
            data_dir: dir.path().join("data"),
            ..Inputs::default()
        };
        let (first, token_path) = Settings::resolve(inputs.clone()).expect("resolves");
        let token_path = token_path.expect("embedded token path");
        let mode = std::fs::metadata(&token_path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pepper_mode = std::fs::metadata(dir.path().join("data/pepper"))
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(pepper_mode & 0o777, 0o600);
        let (second, _) = Settings::resolve(inputs).expect("resolves again");
        assert_eq!(
            first.api_token.as_ref().map(|t| t.expose()),
            second.api_token.as_ref().map(|t| t.expose())
        );
        assert_eq!(first.pepper.expose(), second.pepper.expose());
    }
}
