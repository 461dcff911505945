//! Test harness: a fresh PostgreSQL database (or SQLite folder) per test, the real
//! application on a random port, an HTTP client, and every log line captured so tests can
//! prove no secret reaches it.

#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use keyledger::app::Application;
use keyledger::config::{Inputs, Roles, Settings};
use keyledger::domain::Policy;
use keyledger::kafka::BusConfig;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-token-0123456789abcdef0123456789";
/// The base64 of a 32-byte Ed25519 seed, signing every test's log.
pub const SIGNING_KEY: &str = "dGVzdC1zaWduaW5nLWtleS0wMTIzNDU2Nzg5YWJjZGU=";
pub const PEPPER: &str = "test-pepper-0123456789abcdef0123456789abcdef";
pub const LOGIN: &str = "john.doe@agency.gov.sg";

/// The PostgreSQL server the tests use (KEYLEDGER_TEST_DATABASE_URL, or the local one).
pub fn admin_url() -> String {
    std::env::var("KEYLEDGER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, name: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("//") && i > url.find("//").map(|j| j + 1).unwrap_or(0) => {
            let (base, rest) = url.split_at(i);
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{base}/{name}{query}")
        }
        _ => format!("{url}/{name}"),
    }
}

/// Creates a fresh, empty database and returns its URL.
pub async fn fresh_database() -> String {
    let name = format!("kl_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin_url())
        .await
        .expect("PostgreSQL must be reachable (see scripts/test)");
    conn.execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
        .await
        .expect("create database");
    with_database(&admin_url(), &name)
}

/// A shared buffer that receives every log line of this test process.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::env::var_os("KEYLEDGER_TEST_LOG").is_some() {
            let _ = std::io::stderr().write_all(buf);
        }
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<LogBuffer> = OnceLock::new();

/// Installs the capturing subscriber (trace level for keyledger) once per process.
pub fn capture_logs() -> LogBuffer {
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "keyledger=trace,sqlx=debug,info",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        buffer
    })
    .clone()
}

pub fn captured_logs() -> String {
    let buf = capture_logs();
    let bytes = buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Where a test app keeps its events.
#[derive(Clone, Debug)]
pub enum Backing {
    Postgres(String),
    Embedded(PathBuf),
}

impl Backing {
    pub async fn postgres() -> Self {
        Backing::Postgres(fresh_database().await)
    }

    pub fn embedded(dir: &tempfile::TempDir) -> Self {
        Backing::Embedded(dir.path().join("data"))
    }
}

pub fn settings(backing: &Backing, policy: Policy) -> Settings {
    settings_with(backing, policy, None, Roles::ALL)
}

pub fn settings_with(
    backing: &Backing,
    policy: Policy,
    bus: Option<BusConfig>,
    roles: Roles,
) -> Settings {
    let (database_url, data_dir) = match backing {
        Backing::Postgres(url) => (Some(url.clone()), PathBuf::from("unused")),
        Backing::Embedded(dir) => (None, dir.clone()),
    };
    let inputs = Inputs {
        listen: "127.0.0.1:0".into(),
        data_dir,
        database_url,
        pepper: Some(PEPPER.into()),
        api_token: Some(TOKEN.into()),
        tokens_file: None,
        signing_key: Some(SIGNING_KEY.into()),
        previous_log_keys: Vec::new(),
        metrics_listen: None,
        policy,
        default_from: Some("donotreply@mail.postman.gov.sg".into()),
        max_db_connections: 8,
        legacy_salt: None,
        legacy_checks_per_second: 0.0,
        bus,
        roles,
        reminders: Default::default(),
        usage_flush: None,
    };
    Settings::resolve(inputs).expect("valid settings").0
}

/// The real application, serving on a random port.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Where `/metrics` listens when it has a listener of its own.
    pub metrics_addr: Option<SocketAddr>,
    pub http: reqwest::Client,
    pub backing: Backing,
    pub bus: Option<BusConfig>,
    pub roles: Roles,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(backing: Backing) -> Self {
        Self::spawn_with(backing, Policy::default()).await
    }

    pub async fn spawn_with(backing: Backing, policy: Policy) -> Self {
        Self::spawn_full(backing, policy, None, Roles::ALL).await
    }

    /// The service with the bus on (PostgreSQL only), running `roles`.
    pub async fn spawn_bus(backing: Backing, bus: BusConfig, roles: Roles) -> Self {
        Self::spawn_full(backing, Policy::default(), Some(bus), roles).await
    }

    pub async fn spawn_full(
        backing: Backing,
        policy: Policy,
        bus: Option<BusConfig>,
        roles: Roles,
    ) -> Self {
        let settings = settings_with(&backing, policy, bus, roles);
        Self::spawn_settings(backing, settings).await
    }

    /// The service as `settings` say (a manual clock, reminders, …).
    pub async fn spawn_settings(backing: Backing, settings: Settings) -> Self {
        capture_logs();
        let (bus, roles) = (settings.bus.clone(), settings.roles);
        let app = Application::build(settings.clone())
            .await
            .expect("app builds");
        let addr = app.local_addr().expect("bound");
        let metrics_addr = app.metrics_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            metrics_addr,
            http: reqwest::Client::new(),
            backing,
            bus,
            roles,
            settings,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server (graceful) and starts a new one on the same data.
    pub async fn restart(mut self) -> Self {
        self.shutdown().await;
        Self::spawn_settings(self.backing.clone(), self.settings.clone()).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> String {
        let response = self.get_open("/metrics").await;
        response.text().await.expect("metrics")
    }

    /// `GET path` without a token (the open routes).
    pub async fn get_open(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(TOKEN, method, path, body).await
    }

    /// As [`TestApp::call`], with `token`.
    pub async fn call_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        read(req.send().await.expect("request sent")).await
    }

    pub async fn generate(
        &self,
        account: &str,
        label: &str,
        contacts: &[&str],
    ) -> (StatusCode, Value) {
        let body = json!({"label": label, "contacts": contacts, "login_email": LOGIN});
        self.call(
            reqwest::Method::POST,
            &format!("/v1/accounts/{account}/keys"),
            Some(body),
        )
        .await
    }

    pub async fn list(&self, account: &str) -> Value {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/accounts/{account}/keys"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub async fn verify(&self, api_key: &str, from: Option<&str>) -> Value {
        let mut body = json!({"api_key": api_key});
        if let Some(f) = from {
            body["from"] = json!(f);
        }
        let (status, body) = self
            .call(reqwest::Method::POST, "/v1/verify", Some(body))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Every event stored, as (account, sequence, type) — for "nothing changed" checks.
    pub async fn event_count(&self) -> i64 {
        match &self.backing {
            Backing::Postgres(url) => {
                let mut c = PgConnection::connect(url).await.expect("connect");
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&mut c)
                    .await
                    .expect("count")
            }
            Backing::Embedded(dir) => {
                let path = dir.join("keyledger.db");
                let mut c =
                    sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                        .await
                        .expect("open sqlite");
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(&mut c)
                    .await
                    .expect("count")
            }
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn read(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

/// Every row of every table of a PostgreSQL database, as text.
pub async fn dump_postgres(url: &str) -> String {
    let mut c = PgConnection::connect(url).await.expect("connect");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut c)
    .await
    .expect("tables");
    let mut out = String::new();
    for t in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {t} t"))
            .fetch_all(&mut c)
            .await
            .expect("rows");
        out.push_str(&t);
        out.push('\n');
        for r in rows {
            out.push_str(&r);
            out.push('\n');
        }
    }
    out
}

/// Every byte of the embedded store's files (database and write-ahead log).
pub fn dump_files(dir: &std::path::Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    out
}

/// The real application on PostgreSQL with a manual clock (returned), the legacy salt
/// `salt`, and the legacy cut-off 30 days ahead.
pub async fn spawn_with_legacy_cutoff_in_30_days(
    salt: &str,
) -> (SocketAddr, std::sync::Arc<keyledger::domain::ManualClock>) {
    let backing = Backing::postgres().await;
    let now = chrono::Utc::now();
    let policy = Policy {
        legacy_expiry: now + chrono::Duration::days(30),
        ..Policy::default()
    };
    let clock = Arc::new(keyledger::domain::ManualClock::new(now));
    let mut settings = settings(&backing, policy);
    settings.clock = clock.clone();
    settings.legacy_salt = Some(salt.to_owned());
    let app = Application::build(settings).await.expect("builds");
    let addr = app.local_addr().expect("addr");
    tokio::spawn(app.run_until(std::future::pending()));
    (addr, clock)
}

/// `POST` of `body` to `path` on the app at `addr`, with the admin token.
pub async fn post(addr: SocketAddr, path: &str, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("sent");
    read(resp).await
}

/// A legacy key made the way Postman made them: bcrypt (at `cost`) of the secret part under
/// a server-wide salt. Returns (plaintext key, salt, hash without the salt).
pub fn postman_legacy_key(username: &str, cost: u32) -> (String, String, String) {
    use base64::Engine;
    use rand::RngCore;
    let mut raw = [0u8; 33];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let secret = base64::engine::general_purpose::STANDARD.encode(raw);
    let full = bcrypt::hash_with_result(&secret, cost)
        .expect("bcrypt")
        .format_for_version(bcrypt::Version::TwoB);
    let (salt, tail) = full.split_at(29);
    (
        format!("{username}_v1_{secret}"),
        salt.to_owned(),
        tail.to_owned(),
    )
}
