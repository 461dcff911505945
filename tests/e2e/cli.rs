//! The CLI is a client of the HTTP API: generate, list, verify (key on standard input).

use std::process::Stdio;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::common::{Backing, TestApp, LOGIN, TOKEN};

async fn keyledger(app: &TestApp, args: &[&str], stdin: Option<&str>) -> (bool, Value, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .arg("keys")
        .args(["--server", &app.url("")])
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    if let Some(mut pipe) = child.stdin.take() {
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).await.expect("stdin");
        }
    }
    let out = child.wait_with_output().await.expect("finishes");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_manages_keys_through_the_api() {
    let app = TestApp::spawn(Backing::postgres().await).await;
    let (ok, generated, err) = keyledger(
        &app,
        &[
            "generate",
            "--account",
            "cli-acc",
            "--label",
            "from-cli",
            "--contact",
            "ops@agency.gov.sg",
            "--login-email",
            LOGIN,
        ],
        None,
    )
    .await;
    assert!(ok, "{err}");
    let key = generated["api_key"]
        .as_str()
        .expect("key printed once")
        .to_owned();
    let (ok, listing, err) = keyledger(&app, &["list", "--account", "cli-acc"], None).await;
    assert!(ok, "{err}");
    assert_eq!(listing["keys"][0]["label"], "from-cli");
    let (ok, verified, err) = keyledger(&app, &["verify", "--from", LOGIN], Some(&key)).await;
    assert!(ok, "{err}");
    assert_eq!(verified["valid"], true);
    assert_eq!(verified["from_allowed"], true);
    let key_id = generated["key_id"].as_str().expect("id");
    let (ok, rotated, err) = keyledger(
        &app,
        &[
            "rotate",
            "--account",
            "cli-acc",
            "--key-id",
            key_id,
            "--label",
            "next",
        ],
        None,
    )
    .await;
    assert!(ok, "{err}");
    assert!(rotated["old_key_expires_at"].is_string());
    let (ok, _, err) = keyledger(
        &app,
        &[
            "contacts",
            "--account",
            "cli-acc",
            "--key-id",
            key_id,
            "--contact",
            "new@agency.gov.sg",
        ],
        None,
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = keyledger(
        &app,
        &["revoke", "--account", "cli-acc", "--key-id", key_id],
        None,
    )
    .await;
    assert!(ok, "{err}");
    // An error answer: a clear message on stderr and a failing exit code.
    let (ok, body, err) = keyledger(
        &app,
        &["revoke", "--account", "cli-acc", "--key-id", key_id],
        None,
    )
    .await;
    assert!(!ok);
    assert_eq!(body["error"]["code"], "key_revoked");
    assert!(err.contains("revoked"), "{err}");
}

#[tokio::test]
async fn the_cli_tells_a_keys_history_as_a_timeline_and_draws_it() {
    let app = TestApp::spawn(Backing::postgres().await).await;
    let (status, body) = app.generate("cli-h", "prod", &["ops@agency.gov.sg"]).await;
    assert!(status.is_success(), "{body}");
    let key_id = body["key_id"].as_str().expect("id").to_owned();
    let (ok, _, err) = keyledger(
        &app,
        &[
            "rotate",
            "--account",
            "cli-h",
            "--key-id",
            &key_id,
            "--label",
            "prod-2",
            "--revoke-old-on-first-use",
        ],
        None,
    )
    .await;
    assert!(ok, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["keys", "--server", &app.url("")])
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .args(["history", "--account", "cli-h", "--key-id", &key_id])
        .output()
        .await
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("KeyGenerated") && lines[0].contains("created 'prod'"),
        "{text}"
    );
    assert!(
        lines[2].contains("KeyRotated") && lines[2].contains("on the successor's first use"),
        "{text}"
    );
    assert!(lines.iter().all(|l| l.contains("(by admin)")), "{text}");

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("history.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["keys", "--server", &app.url("")])
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .args([
            "history",
            "--account",
            "cli-h",
            "--key-id",
            &key_id,
            "--svg",
        ])
        .arg(&file)
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&file).expect("written");
    let doc = roxmltree::Document::parse(&svg).expect("an SVG");
    assert_eq!(
        doc.descendants()
            .filter(|n| n.attribute("class") == Some("event"))
            .count(),
        3
    );
    let (ok, all, err) = keyledger(
        &app,
        &["list", "--account", "cli-h", "--include-inactive"],
        None,
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(all["keys"].as_array().map(Vec::len), Some(2));
}

/// `git` in `dir`, failing the test on an error.
fn git(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn scan_finds_keys_in_files_and_history_and_never_prints_one() {
    // Three real keys (generated by the service), in three places.
    let app = TestApp::spawn(Backing::postgres().await).await;
    let mut keys = Vec::new();
    for label in ["a", "b", "c"] {
        let (status, body) = app
            .generate("scan-acc", label, &["ops@agency.gov.sg"])
            .await;
        assert!(status.is_success(), "{body}");
        keys.push(body["api_key"].as_str().expect("key").to_owned());
    }
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("config/deep")).expect("dirs");
    std::fs::write(
        root.join("README.md"),
        "nothing here but johndoe_v1_short\n",
    )
    .expect("write");
    std::fs::write(
        root.join("config/app.env"),
        format!("# settings\nPOSTMAN_API_KEY={}\n", keys[0]),
    )
    .expect("write");
    std::fs::write(
        root.join("config/deep/notes.txt"),
        format!(
            "line one\nline two\ncurl -H 'Authorization: Bearer {}'\n",
            keys[1]
        ),
    )
    .expect("write");
    // The third was committed, then deleted: only the history has it.
    git(root, &["init", "-q"]);
    std::fs::write(
        root.join("leaked.json"),
        format!("{{\n  \"key\": \"{}\"\n}}\n", keys[2]),
    )
    .expect("write");
    git(root, &["add", "-A"]);
    git(root, &["commit", "-q", "-m", "oops"]);
    std::fs::remove_file(root.join("leaked.json")).expect("rm");
    git(root, &["commit", "-q", "-am", "remove the key"]);

    let scan = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
            .arg("scan")
            .args(args)
            .arg(root)
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, files_only, err) = scan(&[]);
    assert_eq!(code, Some(1), "found keys exit 1: {err}");
    assert_eq!(files_only.lines().count(), 2, "{files_only}");
    assert!(
        files_only.contains("config/app.env:2: a key ending …"),
        "{files_only}"
    );
    assert!(
        files_only.contains("config/deep/notes.txt:3: a key ending …"),
        "{files_only}"
    );

    let (code, with_history, err) = scan(&["--git"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        with_history.contains(":leaked.json:2: a key ending …"),
        "{with_history}"
    );
    for key in &keys {
        assert!(
            with_history.contains(&key[key.len() - 5..]),
            "last five of each key shown"
        );
        assert!(
            !with_history.contains(key.as_str()) && !err.contains(key.as_str()),
            "never the key itself"
        );
    }
    let (code, json, _) = scan(&["--git", "--json"]);
    assert_eq!(code, Some(1));
    let found: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        found["keys"],
        serde_json::json!(3),
        "three distinct keys: {json}"
    );
    // Two in the files, and all three in the history (the first commit added every file).
    assert_eq!(found["found"].as_array().map(Vec::len), Some(5), "{json}");

    // --report: every key found goes to POST /v1/leaks; the live ones are revoked.
    // (Async: the app answers on this test's runtime.)
    let out = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["scan", "--git", "--report", "--source", "repo scan:"])
        .args(["--server", &app.url("")])
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .arg(root)
        .output()
        .await
        .expect("runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches(": revoked").count(), 3, "{stderr}");
    for key in &keys {
        assert!(!stdout.contains(key.as_str()) && !stderr.contains(key.as_str()));
        assert_eq!(app.verify(key, None).await["code"], "revoked");
    }

    // A clean folder: exit 0.
    let clean = tempfile::tempdir().expect("dir");
    std::fs::write(clean.path().join("a.txt"), "no keys\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["scan"])
        .arg(clean.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test]
async fn the_cli_lists_keys_as_a_table_with_the_ones_expiring_soon_in_colour() {
    let app = TestApp::spawn(Backing::postgres().await).await;
    let (status, body) = app
        .generate("tbl-acc", "prod", &["ops@agency.gov.sg"])
        .await;
    assert!(status.is_success(), "{body}");
    let key = body["api_key"].as_str().expect("key").to_owned();
    let old_id = body["key_id"].as_str().expect("id").to_owned();
    // A rotation cuts the old key to a day's grace: it expires within 28 days.
    let (status, body) = app
        .call(
            reqwest::Method::POST,
            &format!("/v1/accounts/tbl-acc/keys/{old_id}/rotate"),
            Some(serde_json::json!({"label": "prod-2", "grace_seconds": 86400})),
        )
        .await;
    assert!(status.is_success(), "{body}");
    assert_eq!(
        app.verify(&key, None).await["valid"],
        serde_json::json!(true)
    );

    let out = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .args(["keys", "--server", &app.url("")])
        .args(["list", "--account", "tbl-acc", "--table"])
        .env("KEYLEDGER_API_TOKEN", TOKEN)
        .env("CLICOLOR_FORCE", "1")
        .output()
        .await
        .expect("runs");
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("LABEL"), "{table}");
    let old = lines
        .iter()
        .find(|l| l.contains("prod "))
        .expect("old key row");
    assert!(old.starts_with("\x1b[31m"), "a day left: red: {old:?}");
    assert!(old.contains(&format!("…{}", &key[key.len() - 5..])));
    assert!(
        old.contains("expires in 23 hours") || old.contains("expires in 1 day"),
        "{old}"
    );
    let new = lines
        .iter()
        .find(|l| l.contains("prod-2"))
        .expect("new key row");
    assert!(!new.contains('\x1b') && new.contains("never"), "{new:?}");
    // Piped without --table: the JSON scripts read, as before.
    let (ok, listing, err) = keyledger(&app, &["list", "--account", "tbl-acc"], None).await;
    assert!(ok, "{err}");
    assert_eq!(listing["keys"].as_array().map(Vec::len), Some(2));
}
