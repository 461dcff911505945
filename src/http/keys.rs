//! The key routes: generate, list, update contacts, revoke, rotate, migrate a legacy key.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use chrono::{DateTime, Utc};
use keyledger_events::Command;
use keyledger_projections::ListingRow;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{idempotency_key, ApiJson, ApiQuery};
use super::AppState;
use crate::domain::AccountId;
use crate::handler::{Outcome, Request, Status};
use crate::keyring::{KeyFacts, KeyringError};
use crate::read_side::history;
use crate::store::usage::{self, KeyUsage};
use crate::tokens::Caller;

#[derive(Deserialize)]
pub struct GenerateBody {
    label: String,
    contacts: Vec<String>,
    login_email: String,
}

#[derive(Deserialize)]
pub struct ContactsBody {
    contacts: Vec<String>,
}

#[derive(Deserialize)]
pub struct RotateBody {
    label: String,
    #[serde(default)]
    grace_seconds: Option<i64>,
    #[serde(default)]
    revoke_old_on_first_use: bool,
}

#[derive(Deserialize)]
pub struct LegacyBody {
    login_email: String,
    legacy_hash: String,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
}

/// A key as the API shows it.
#[derive(Serialize)]
pub struct KeyView {
    key_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
    label: String,
    last_five: String,
    contacts: Vec<String>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_key_expires_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
pub struct RowView {
    key_id: Uuid,
    label: String,
    last_five: String,
    contacts: Vec<String>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_cause: Option<&'static str>,
    /// When last verified (null when never), from the usage table (the present's, also
    /// in a listing `as_of` an earlier instant).
    last_used_at: Option<DateTime<Utc>>,
    verifications_30d: i64,
}

impl RowView {
    /// `row` with its status as of `now` and its usage.
    fn of(row: ListingRow, now: DateTime<Utc>, usage: Option<&KeyUsage>) -> Self {
        let status = row.status_at(now).as_str();
        Self {
            last_used_at: usage.and_then(|u| u.last_used_at),
            verifications_30d: usage.map(|u| u.verifications_30d).unwrap_or(0),
            key_id: row.key_id,
            label: row.label,
            last_five: row.last_five,
            contacts: row.contacts,
            created_at: row.created_at,
            expires_at: row.expires_at,
            status,
            revoked_at: row.revoked.as_ref().map(|r| r.at),
            revoked_cause: row.revoked.as_ref().map(|r| r.cause.as_str()),
        }
    }
}

/// The query of `GET …/keys` (other parameters are ignored, as they always were).
#[derive(Deserialize)]
pub struct ListQuery {
    /// `inactive`: revoked keys too.
    #[serde(default)]
    include: Option<String>,
    /// The listing as it stood at this instant (RFC 3339), folded from the log.
    #[serde(default)]
    as_of: Option<String>,
    /// Only keys not verified for this many days (never verified included).
    #[serde(default)]
    unused_for: Option<String>,
}

/// What a listing asks for.
struct Asked {
    inactive: bool,
    as_of: Option<DateTime<Utc>>,
    unused_for: Option<chrono::Duration>,
}

impl ListQuery {
    /// What is asked — or a precise error.
    fn parse(&self, now: DateTime<Utc>) -> Result<Asked, ApiError> {
        let inactive = match self.include.as_deref() {
            None => false,
            Some("inactive") => true,
            Some(other) => {
                return Err(ApiError::invalid_request(format!(
                    "include must be 'inactive', not '{other}'"
                )))
            }
        };
        let as_of = match self.as_of.as_deref() {
            None => None,
            Some(raw) => {
                let t = DateTime::parse_from_rfc3339(raw)
                    .map_err(|e| {
                        ApiError::invalid_request(format!(
                            "as_of must be an RFC 3339 instant such as 2026-06-30T16:00:00Z ({e})"
                        ))
                    })?
                    .with_timezone(&Utc);
                if t > now {
                    return Err(ApiError::invalid_request(
                        "as_of is in the future: the log tells what was, not what will be",
                    ));
                }
                Some(t)
            }
        };
        let unused_for = match self.unused_for.as_deref() {
            None => None,
            Some(raw) => match raw.parse::<u32>() {
                Ok(days @ 1..=3650) => Some(chrono::Duration::days(i64::from(days))),
                _ => {
                    return Err(ApiError::invalid_request(format!(
                        "unused_for must be a number of days from 1 to 3650, not '{raw}'"
                    )))
                }
            },
        };
        Ok(Asked {
            inactive,
            as_of,
            unused_for,
        })
    }
}

/// The query of `GET …/history`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// `json` (the default) or `svg` (a picture of the timeline).
    #[serde(default)]
    format: Option<String>,
}

fn account(raw: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(raw).map_err(|e| KeyringError::from(e).into())
}

/// A key id in a path: anything that is not a UUID names no key.
fn key_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no key '{raw}' in this account"),
        )
    })
}

async fn run(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    account_id: AccountId,
    command: Command,
) -> Result<Outcome, ApiError> {
    let command_id = idempotency_key(headers)?.unwrap_or_else(Uuid::now_v7);
    let outcome = state
        .handler
        .execute(Request {
            account_id,
            command_id,
            actor: caller.name.clone(),
            command,
            reply_key: None,
        })
        .await?;
    Ok(outcome)
}

fn key_view(outcome: &Outcome, now: DateTime<Utc>) -> Result<KeyView, ApiError> {
    let key: &KeyFacts = outcome
        .key
        .as_ref()
        .ok_or_else(|| ApiError::from(KeyringError::Internal("the command named no key".into())))?;
    let status = if key.is_live_at(now) {
        "active"
    } else {
        "expired"
    };
    Ok(KeyView {
        key_id: key.key_id,
        api_key: outcome.api_key.as_ref().map(|k| k.expose().to_owned()),
        label: key.label.clone(),
        last_five: key.last_five.clone(),
        contacts: key.contacts.clone(),
        created_at: key.created_at,
        expires_at: key.expires_at,
        status,
        old_key_expires_at: outcome.rotated.as_ref().map(|k| k.expires_at),
    })
}

/// 201 with the new key, or 200 without it when the request was a replay.
fn created(outcome: Outcome, now: DateTime<Utc>) -> Result<Response, ApiError> {
    let view = key_view(&outcome, now)?;
    Ok(match outcome.status {
        Status::Accepted => (StatusCode::CREATED, Json(view)).into_response(),
        Status::Duplicate => {
            let mut r = (StatusCode::OK, Json(view)).into_response();
            r.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            r
        }
    })
}

pub async fn generate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<GenerateBody>,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let command = Command::GenerateKey {
        label: body.label,
        contacts: body.contacts,
        login_email: body.login_email,
    };
    let outcome = run(&state, &caller, &headers, account_id, command).await?;
    created(outcome, state.clock.now())
}

pub async fn list(
    State(state): State<AppState>,
    Path(account_id): Path<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let now = state.clock.now();
    let Asked {
        inactive,
        as_of,
        unused_for,
    } = query.parse(now)?;
    let rows = if inactive || as_of.is_some() {
        // From the log: the listing table holds only the present's live keys.
        history::listing_at(&state.store, account_id.as_str(), as_of, inactive).await?
    } else {
        crate::read_side::listing::rows(&state.store, Some(account_id.as_str())).await?
    };
    let usage = usage::of_account(&state.store, account_id.as_str(), usage::day_of(now)).await?;
    let at = as_of.unwrap_or(now);
    let keys: Vec<RowView> = rows
        .into_iter()
        .map(|r| {
            let u = usage.get(&r.key_id);
            RowView::of(r, at, u)
        })
        .filter(|v| match (unused_for, v.last_used_at) {
            (Some(d), Some(last)) => last <= now - d,
            _ => true,
        })
        .collect();
    Ok(Json(serde_json::json!({ "keys": keys })).into_response())
}

/// `GET …/keys/{key_id}/history`: every event of the key, in order, with its actor.
pub async fn history(
    State(state): State<AppState>,
    Path((account_id, key)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let key_id = key_id(&key)?;
    let svg = match query.format.as_deref() {
        None | Some("json") => false,
        Some("svg") => true,
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "format must be 'json' or 'svg', not '{other}'"
            )))
        }
    };
    let moments = history::of_key(&state.store, account_id.as_str(), key_id).await?;
    if moments.is_empty() {
        return Err(KeyringError::KeyNotFound(key_id).into());
    }
    if svg {
        return Ok((
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    HeaderValue::from_static("image/svg+xml"),
                ),
                (
                    axum::http::header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
            ],
            crate::read_side::timeline::svg(key_id, &moments),
        )
            .into_response());
    }
    Ok(Json(serde_json::json!({ "events": moments })).into_response())
}

pub async fn update_contacts(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((account_id, key)): Path<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ContactsBody>,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let key_id = key_id(&key)?;
    let command = Command::UpdateContacts {
        key_id,
        contacts: body.contacts,
    };
    let outcome = run(&state, &caller, &headers, account_id.clone(), command).await?;
    // The row as the command left it (the listing table may be fed asynchronously).
    let now = state.clock.now();
    let view = key_view(&outcome, now)?;
    // The command is done: a usage table that cannot be read leaves the fields empty.
    let usage = match usage::of_account(&state.store, account_id.as_str(), usage::day_of(now)).await
    {
        Ok(mut u) => u.remove(&view.key_id),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read key usage; answering without it");
            None
        }
    };
    Ok(Json(RowView {
        last_used_at: usage.and_then(|u| u.last_used_at),
        verifications_30d: usage.map(|u| u.verifications_30d).unwrap_or(0),
        key_id: view.key_id,
        label: view.label,
        last_five: view.last_five,
        contacts: view.contacts,
        created_at: view.created_at,
        expires_at: view.expires_at,
        status: view.status,
        revoked_at: None,
        revoked_cause: None,
    })
    .into_response())
}

pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((account_id, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let key_id = key_id(&key)?;
    run(
        &state,
        &caller,
        &headers,
        account_id,
        Command::RevokeKey { key_id },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn rotate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((account_id, key)): Path<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RotateBody>,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let key_id = key_id(&key)?;
    let command = Command::RotateKey {
        key_id,
        label: body.label,
        grace_seconds: body.grace_seconds,
        revoke_old_on_first_use: body.revoke_old_on_first_use,
    };
    let outcome = run(&state, &caller, &headers, account_id, command).await?;
    created(outcome, state.clock.now())
}

pub async fn migrate_legacy(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LegacyBody>,
) -> Result<Response, ApiError> {
    let account_id = account(&account_id)?;
    let command = Command::MigrateLegacyKey {
        login_email: body.login_email,
        legacy_hash: body.legacy_hash,
        created_at: body.created_at,
    };
    let outcome = run(&state, &caller, &headers, account_id, command).await?;
    created(outcome, state.clock.now())
}
