//! Bulk legacy migration: 10,000 generated rows with 50 bad ones, run twice; a migrated key
//! whose plaintext the test knows verifies by Postman's bcrypt scheme until the cut-off.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::TOKEN;

const ROWS: usize = 10_000;

async fn migrate_legacy(
    addr: std::net::SocketAddr,
    input: &std::path::Path,
    extra: &[&str],
) -> (i32, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["migrate-legacy", "--json", "--concurrency", "8"])
        .args(extra)
        .arg("--input")
        .arg(input)
        .args(["--server", &format!("http://{addr}")])
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .output()
        .await
        .expect("runs");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_legacy_rows_migrate_once_and_bad_rows_are_reported() {
    // The one row whose plaintext we know, hashed the way Postman did (cost 4 keeps the
    // test fast; the salt's cost is part of the configured salt).
    let (known_key, salt, tail) = crate::common::postman_legacy_key("user0", 4);

    let mut csv = String::from("account_id,login_email,legacy_hash,created_at\n");
    let mut bad_rows = BTreeSet::new();
    for i in 0..ROWS {
        let line_number = i + 2; // the header is line 1
        let account = format!("legacy-{i:05}");
        let email = format!("user{i}@agency.gov.sg");
        let hash_tail = if i == 0 {
            tail.clone()
        } else {
            format!("{:031}", i)
        };
        let good = format!("{account},{email},user{i}_v1_{hash_tail},2023-01-01T00:00:00Z");
        let line = if i % 200 == 7 {
            bad_rows.insert(line_number);
            match (i / 200) % 5 {
                0 => format!("{account},not-an-email,user{i}_v1_{hash_tail}"),
                1 => format!("{account},{email},user{i}_v1_tooshort"),
                2 => format!("{account},{email},someoneelse_v1_{hash_tail}"),
                3 => format!("{account},{email},user{i}_v1_{hash_tail},2999-01-01T00:00:00Z"),
                _ => format!("{account},{email}"),
            }
        } else {
            good
        };
        let _ = writeln!(csv, "{line}");
    }
    assert_eq!(bad_rows.len(), 50);
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("legacy.csv");
    std::fs::write(&input, csv).expect("write");

    let (addr, clock) = crate::common::spawn_with_legacy_cutoff_in_30_days(&salt).await;

    let (code, dry) = migrate_legacy(addr, &input, &["--dry-run"]).await;
    assert_eq!(code, 3);
    assert_eq!(dry["valid"], ROWS - 50, "{dry}");
    assert_eq!(dry["migrated"], 0, "a dry run sends nothing");

    let (code, first) = migrate_legacy(addr, &input, &[]).await;
    assert_eq!(code, 3, "rejected rows make the exit status 3: {first}");
    assert_eq!(first["rows"], ROWS);
    assert_eq!(first["migrated"], ROWS - 50);
    assert_eq!(first["already_migrated"], 0);
    let rejected: BTreeSet<usize> = first["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .filter_map(|r| r["row"].as_u64().map(|n| n as usize))
        .collect();
    assert_eq!(rejected, bad_rows, "each bad row reported by its number");
    assert!(first["rejected"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("login email"));

    let (_, second) = migrate_legacy(addr, &input, &[]).await;
    assert_eq!(
        second["migrated"], 0,
        "a rerun migrates nothing new: {second}"
    );
    assert_eq!(second["already_migrated"], ROWS - 50);

    let http = reqwest::Client::new();
    let verify = |key: String| {
        let http = http.clone();
        async move {
            let resp = http
                .post(format!("http://{addr}/v1/verify"))
                .bearer_auth(TOKEN)
                .json(&json!({"api_key": key}))
                .send()
                .await
                .expect("sent");
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.expect("json")
        }
    };
    let v = verify(known_key.clone()).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["account_id"], "legacy-00000");
    assert_eq!(v["label"], "default");
    clock.advance(chrono::Duration::days(31));
    assert_eq!(
        verify(known_key).await["code"],
        "expired",
        "not after the cut-off"
    );
}
