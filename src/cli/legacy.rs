//! `keyledger migrate-legacy --input FILE`: brings over every legacy key in one run.
//!
//! Reads a CSV (`account_id,login_email,legacy_hash[,created_at]`, header optional) or a
//! JSON-lines export, validates each row with the same domain parsers the aggregate uses,
//! and issues MigrateLegacyKey for each valid row through the HTTP API (one writer path),
//! several at a time. The command id of each row is derived from its account id, so a
//! rerun changes nothing and reports the rows as already migrated. `--dry-run` validates
//! only. Exit status 3 when rows were rejected.

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::client::{enc, Client};
use super::ClientArgs;
use crate::domain::{legacy_hash_username, AccountId, LoginEmail};

/// Derives the command id of a row: the same account always gets the same id.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6761_6379_6d69_6772_6174_696f_6e00);

#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    account_id: String,
    login_email: String,
    legacy_hash: String,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
}

/// One rejected row.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub row: usize,
    pub reason: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub rows: usize,
    pub migrated: usize,
    pub already_migrated: usize,
    pub valid: usize,
    pub rejected: Vec<Rejected>,
    pub dry_run: bool,
}

/// Parses one row of the export: a JSON object, or one CSV record (RFC 4180: quoted fields
/// may hold commas, quotes and newlines).
pub fn parse_line(line: &str, jsonl: bool) -> Result<Row, String> {
    if jsonl {
        return serde_json::from_str(line).map_err(|e| format!("not a JSON row: {e}"));
    }
    let mut reader = csv_reader(line.as_bytes());
    match reader.records().next() {
        Some(Ok(record)) => parse_record(&record),
        Some(Err(e)) => Err(format!("not a CSV row: {e}")),
        None => Err("empty row".into()),
    }
}

fn csv_reader(bytes: &[u8]) -> csv::Reader<&[u8]> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes)
}

fn parse_record(fields: &csv::StringRecord) -> Result<Row, String> {
    if !(3..=4).contains(&fields.len()) {
        return Err(format!(
            "expected 3 or 4 comma-separated fields, found {}",
            fields.len()
        ));
    }
    let created_at = match fields.get(3).filter(|f| !f.is_empty()) {
        Some(f) => Some(
            DateTime::parse_from_rfc3339(f)
                .map_err(|e| format!("created_at is not an RFC 3339 time: {e}"))?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    Ok(Row {
        account_id: fields[0].to_owned(),
        login_email: fields[1].to_owned(),
        legacy_hash: fields[2].to_owned(),
        created_at,
    })
}

/// The checks the aggregate would make, made before anything is sent.
pub fn validate(row: &Row, now: DateTime<Utc>) -> Result<(), String> {
    AccountId::parse(&row.account_id).map_err(|e| format!("invalid account id: {e}"))?;
    let login =
        LoginEmail::parse(&row.login_email).map_err(|e| format!("invalid login email: {e}"))?;
    let username =
        legacy_hash_username(&row.legacy_hash).map_err(|e| format!("invalid legacy hash: {e}"))?;
    if username != login.username() {
        return Err(format!(
            "invalid legacy hash: username '{username}' does not match the login email's '{}'",
            login.username()
        ));
    }
    if row.created_at.is_some_and(|t| t > now) {
        return Err("created_at is in the future".into());
    }
    Ok(())
}

/// Reads and validates the file; returns the valid rows (with their row numbers) and the
/// report so far.
fn read_rows(path: &std::path::Path, dry_run: bool) -> anyhow::Result<(Vec<(usize, Row)>, Report)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Spreadsheet exports often begin with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let name = path.to_string_lossy();
    let jsonl =
        name.ends_with(".jsonl") || name.ends_with(".ndjson") || text.trim_start().starts_with('{');
    let now = Utc::now();
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    let mut valid = Vec::new();
    let mut take = |number: usize, parsed: Result<Row, String>| {
        report.rows += 1;
        match parsed.and_then(|row| validate(&row, now).map(|()| row)) {
            Ok(row) => valid.push((number, row)),
            Err(reason) => report.rejected.push(Rejected {
                row: number,
                reason,
            }),
        }
    };
    if jsonl {
        for (i, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                take(i + 1, parse_line(line.trim(), true));
            }
        }
    } else {
        for (i, record) in csv_reader(text.as_bytes()).records().enumerate() {
            let number = record
                .as_ref()
                .ok()
                .and_then(|r| r.position())
                .map(|p| line_of(text, p.byte() as usize))
                .unwrap_or(i + 1);
            match record {
                Ok(r) if r.iter().all(str::is_empty) => {}
                Ok(r) if i == 0 && r.get(0) == Some("account_id") => {}
                Ok(r) => take(number, parse_record(&r)),
                Err(e) => take(number, Err(format!("not a CSV row: {e}"))),
            }
        }
    }
    report.valid = valid.len();
    Ok((valid, report))
}

/// The 1-based line where the record that the CSV reader places at byte `at` begins (the
/// reader's position includes the blank lines it skipped before the record).
fn line_of(text: &str, at: usize) -> usize {
    let bytes = text.as_bytes();
    let mut at = at.min(bytes.len());
    while matches!(bytes.get(at), Some(b'\n' | b'\r')) {
        at += 1;
    }
    1 + memchr::memchr_iter(b'\n', &bytes[..at]).count()
}

enum Outcome {
    Migrated,
    Already,
    Rejected(String),
}

async fn migrate_one(client: &Client, row: &Row) -> anyhow::Result<Outcome> {
    let command_id = Uuid::new_v5(&NAMESPACE, format!("legacy/{}", row.account_id).as_bytes());
    let mut body = json!({"login_email": row.login_email, "legacy_hash": row.legacy_hash});
    if let Some(t) = row.created_at {
        body["created_at"] = json!(t);
    }
    let path = format!("/v1/accounts/{}/legacy-key", enc(&row.account_id));
    let (status, answer) = client
        .call_with_id(reqwest::Method::POST, &path, Some(body), Some(command_id))
        .await?;
    Ok(match status.as_u16() {
        201 => Outcome::Migrated,
        200 => Outcome::Already,
        _ if answer["error"]["code"] == "legacy_key_already_migrated" => Outcome::Already,
        s if (400..500).contains(&s) => Outcome::Rejected(
            answer["error"]["message"]
                .as_str()
                .unwrap_or("rejected")
                .to_owned(),
        ),
        s => anyhow::bail!("the server answered {s}: {answer}"),
    })
}

/// Runs the migration; prints the report; returns it.
pub async fn run(
    client_args: &ClientArgs,
    input: &std::path::Path,
    dry_run: bool,
    concurrency: usize,
    json_out: bool,
) -> anyhow::Result<Report> {
    let (rows, mut report) = read_rows(input, dry_run)?;
    if !dry_run {
        let client = Arc::new(Client::new(client_args)?);
        let bar = ProgressBar::new(rows.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let queue = Arc::new(tokio::sync::Mutex::new(rows.into_iter()));
        let workers: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                let (client, queue, bar) = (client.clone(), queue.clone(), bar.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let next = queue.lock().await.next();
                        let Some((number, row)) = next else { break };
                        let outcome = migrate_one(&client, &row).await;
                        bar.inc(1);
                        out.push((number, outcome));
                    }
                    out
                })
            })
            .collect();
        for worker in workers {
            for (number, outcome) in worker.await? {
                match outcome? {
                    Outcome::Migrated => report.migrated += 1,
                    Outcome::Already => report.already_migrated += 1,
                    Outcome::Rejected(reason) => report.rejected.push(Rejected {
                        row: number,
                        reason,
                    }),
                }
            }
        }
        bar.finish_and_clear();
        report.rejected.sort_by_key(|r| r.row);
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} rows: {} migrated, {} already migrated, {} rejected{}",
            report.rows,
            report.migrated,
            report.already_migrated,
            report.rejected.len(),
            if dry_run {
                " (dry run: validated only)"
            } else {
                ""
            }
        );
        for r in &report.rejected {
            println!("  row {}: {}", r.row, r.reason);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_validated_like_the_aggregate_would() {
        let now = Utc::now();
        let ok = parse_line(
            &format!("acc-1,mary.lim@agency.gov.sg,marylim_v1_{}", "a".repeat(31)),
            false,
        )
        .expect("parses");
        assert!(validate(&ok, now).is_ok());
        let other = parse_line(
            &format!("acc-1,mary.lim@agency.gov.sg,johndoe_v1_{}", "a".repeat(31)),
            false,
        )
        .expect("parses");
        assert!(validate(&other, now)
            .unwrap_err()
            .contains("does not match"));
        assert!(parse_line("only,two", false).is_err());
        assert!(parse_line(
            &format!("a,b@c.sg,x_v1_{},yesterday", "a".repeat(31)),
            false
        )
        .is_err());
        let json = parse_line(
            r#"{"account_id":"a","login_email":"x@y.gov.sg","legacy_hash":"h"}"#,
            true,
        )
        .expect("json row");
        assert!(validate(&json, now).unwrap_err().contains("legacy hash"));
    }

    #[test]
    fn the_csv_is_read_by_a_csv_parser() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("export.csv");
        let hash = format!("marylim_v1_{}", "a".repeat(31));
        let text = format!(
            "\u{feff}account_id,login_email,legacy_hash,created_at\n\
             \"acc,1\",mary.lim@agency.gov.sg,{hash},\n\
             \"acc\"\"2\"\"\",\"mary.lim@agency.gov.sg\",{hash},2024-01-01T00:00:00Z\n\
             \n\
             only,two\n"
        );
        std::fs::write(&path, text).expect("write");
        let (valid, report) = read_rows(&path, true).expect("reads");
        assert_eq!(report.rows, 3, "{report:?}");
        assert_eq!(valid.len(), 2, "{report:?}");
        assert_eq!(valid[0].1.account_id, "acc,1");
        assert_eq!(valid[1].1.account_id, "acc\"2\"");
        assert_eq!(valid[1].1.login_email, "mary.lim@agency.gov.sg");
        assert_eq!(report.rejected.len(), 1);
        assert_eq!(report.rejected[0].row, 5);
    }
}
