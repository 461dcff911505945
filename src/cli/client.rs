//! `keyledger keys …`: calls the HTTP API and prints its JSON answers.

use std::io::{IsTerminal, Read};

use anyhow::{bail, Context};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::{ClientArgs, KeysAction, RemindersAction};

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub(crate) fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let token = args.token()?;
        Ok(Self {
            http: reqwest::Client::new(),
            base: args.server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.call_with_id(method, path, body, None).await
    }

    /// Calls the API; `command_id`, when given, is sent as the `Idempotency-Key`.
    pub(crate) async fn call_with_id(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        command_id: Option<uuid::Uuid>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(id) = command_id {
            req = req.header("idempotency-key", id.to_string());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }
}

pub(crate) fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs one `keys` action; prints the answer; fails (exit 1) on an error answer.
pub async fn run_keys(client: &ClientArgs, action: KeysAction) -> anyhow::Result<()> {
    let c = Client::new(client)?;
    let (status, body) = match action {
        KeysAction::Generate {
            account,
            label,
            contacts,
            login_email,
        } => {
            let body = json!({"label": label, "contacts": contacts, "login_email": login_email});
            c.call(
                Method::POST,
                &format!("/v1/accounts/{}/keys", enc(&account)),
                Some(body),
            )
            .await?
        }
        KeysAction::List {
            account,
            include_inactive,
            as_of,
            unused_for,
            json,
            table,
        } => {
            let mut query = Vec::new();
            if include_inactive {
                query.push("include=inactive".to_owned());
            }
            if let Some(t) = &as_of {
                query.push(format!("as_of={}", enc(t)));
            }
            if let Some(d) = unused_for {
                query.push(format!("unused_for={d}"));
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            let (status, body) = c
                .call(
                    Method::GET,
                    &format!("/v1/accounts/{}/keys{query}", enc(&account)),
                    None,
                )
                .await?;
            let terminal = std::io::stdout().is_terminal();
            if status.is_success() && (table || (terminal && !json)) {
                let colour = std::env::var_os("CLICOLOR_FORCE").is_some_and(|v| v != "0")
                    || (terminal && std::env::var_os("NO_COLOR").is_none());
                let rows = body["keys"].as_array().cloned().unwrap_or_default();
                let now = as_of
                    .as_deref()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(chrono::Utc::now);
                print!("{}", super::table::render(&rows, now, colour));
                return Ok(());
            }
            (status, body)
        }
        KeysAction::History {
            account,
            key_id,
            json,
            svg,
        } => return history(&c, &account, &key_id, json, svg).await,
        KeysAction::Contacts {
            account,
            key_id,
            contacts,
        } => {
            let path = format!(
                "/v1/accounts/{}/keys/{}/contacts",
                enc(&account),
                enc(&key_id)
            );
            c.call(Method::PUT, &path, Some(json!({"contacts": contacts})))
                .await?
        }
        KeysAction::Revoke { account, key_id } => {
            c.call(
                Method::DELETE,
                &format!("/v1/accounts/{}/keys/{}", enc(&account), enc(&key_id)),
                None,
            )
            .await?
        }
        KeysAction::Rotate {
            account,
            key_id,
            label,
            grace_seconds,
            revoke_old_on_first_use,
        } => {
            let path = format!(
                "/v1/accounts/{}/keys/{}/rotate",
                enc(&account),
                enc(&key_id)
            );
            let mut body = json!({"label": label});
            if let Some(g) = grace_seconds {
                body["grace_seconds"] = json!(g);
            }
            if revoke_old_on_first_use {
                body["revoke_old_on_first_use"] = json!(true);
            }
            c.call(Method::POST, &path, Some(body)).await?
        }
        KeysAction::Verify { from } => {
            let mut key = String::new();
            std::io::stdin()
                .read_to_string(&mut key)
                .context("cannot read the key from standard input")?;
            let mut body = json!({"api_key": key.trim()});
            if let Some(f) = from {
                body["from"] = json!(f);
            }
            c.call(Method::POST, "/v1/verify", Some(body)).await?
        }
        KeysAction::MigrateLegacy {
            account,
            login_email,
            legacy_hash,
            created_at,
        } => {
            let mut body = json!({"login_email": login_email, "legacy_hash": legacy_hash});
            if let Some(t) = created_at {
                body["created_at"] = json!(t);
            }
            c.call(
                Method::POST,
                &format!("/v1/accounts/{}/legacy-key", enc(&account)),
                Some(body),
            )
            .await?
        }
    };
    if !body.is_null() {
        println!("{}", serde_json::to_string_pretty(&body)?);
    }
    if !status.is_success() {
        return Err(refused(status, &body));
    }
    Ok(())
}

/// Fails with the error answer's message.
fn refused(status: StatusCode, body: &Value) -> anyhow::Error {
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("request failed");
    anyhow::anyhow!("{} ({})", message, status)
}

/// `keys history`: the timeline (one line per event), the JSON, or an SVG file.
async fn history(
    c: &Client,
    account: &str,
    key_id: &str,
    json: bool,
    svg: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let path = format!("/v1/accounts/{}/keys/{}/history", enc(account), enc(key_id));
    if let Some(file) = svg {
        let (status, body) = c
            .call(Method::GET, &format!("{path}?format=svg"), None)
            .await?;
        let Value::String(picture) = &body else {
            return Err(refused(status, &body));
        };
        if !status.is_success() {
            return Err(refused(status, &body));
        }
        std::fs::write(&file, picture)
            .with_context(|| format!("cannot write {}", file.display()))?;
        println!("wrote {}", file.display());
        return Ok(());
    }
    let (status, body) = c.call(Method::GET, &path, None).await?;
    if !status.is_success() {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Err(refused(status, &body));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let moments: Vec<crate::read_side::history::Moment> =
        serde_json::from_value(body["events"].clone()).context("an unexpected answer")?;
    let id = uuid::Uuid::parse_str(key_id).context("the key id is not a UUID")?;
    for m in &moments {
        println!(
            "{:>4}  {}  {:<17}  {}{}",
            m.sequence,
            m.occurred_at.format("%Y-%m-%d %H:%M:%S UTC"),
            m.event_type,
            crate::read_side::timeline::describe(m, id),
            m.actor
                .as_deref()
                .map(|a| format!("  (by {a})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Runs `reminders list`: a table of what falls due, or the JSON answer.
pub async fn run_reminders(client: &ClientArgs, action: RemindersAction) -> anyhow::Result<()> {
    let c = Client::new(client)?;
    let RemindersAction::List {
        account,
        days,
        json,
    } = action;
    let mut path = format!("/v1/reminders?days={days}");
    if let Some(a) = &account {
        path.push_str(&format!("&account_id={}", enc(a)));
    }
    let (status, body) = c.call(Method::GET, &path, None).await?;
    if !status.is_success() {
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or("request failed");
        bail!("{} ({})", message, status);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let rows = body["reminders"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<25} {:<20} {:<36} {:<20} {:<7} {:<6} RECIPIENTS",
        "DUE AT (UTC)", "ACCOUNT", "KEY", "LABEL", "LAST 5", "STAGE"
    );
    for r in &rows {
        let stage = match r["stage"].as_u64() {
            Some(d) => format!("{d}d"),
            None => "expiry".into(),
        };
        let recipients: Vec<&str> = r["recipients"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<25} {:<20} {:<36} {:<20} {:<7} {:<6} {}",
            r["due_at"].as_str().unwrap_or(""),
            r["account_id"].as_str().unwrap_or(""),
            r["key_id"].as_str().unwrap_or(""),
            r["label"].as_str().unwrap_or(""),
            r["last_five"].as_str().unwrap_or(""),
            stage,
            recipients.join(", ")
        );
    }
    println!("{} due within {days} days", rows.len());
    Ok(())
}
