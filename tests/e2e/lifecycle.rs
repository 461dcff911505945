//! The whole life of keys through the HTTP API, on both stores, across a restart; then a
//! scan of every table, file and log line for the plaintext keys.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use keyledger::domain::Clock;

use crate::common::{captured_logs, dump_files, dump_postgres, Backing, TestApp, LOGIN};

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Runs the scenario; returns every plaintext key it saw.
async fn scenario(backing: Backing) -> (Vec<String>, TestApp) {
    let app = TestApp::spawn(backing).await;
    let acc = "agency-42";
    let mut secrets = Vec::new();

    // Generate two keys.
    let (status, prod) = app
        .generate(acc, "prod", &["ops@agency.gov.sg", "Dev@Agency.GOV.SG"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "{prod}");
    let prod_key = s(&prod["api_key"]);
    secrets.push(prod_key.clone());
    assert!(
        prod_key.starts_with("johndoe_v1_"),
        "key prefix from the login email"
    );
    assert_eq!(prod_key.len(), "johndoe_v1_".len() + 44);
    assert_eq!(s(&prod["last_five"]), prod_key[prod_key.len() - 5..]);
    assert_eq!(
        prod["contacts"],
        json!(["ops@agency.gov.sg", "Dev@agency.gov.sg"])
    );
    let prod_id = s(&prod["key_id"]);
    let (status, staging) = app.generate(acc, "staging", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{staging}");
    secrets.push(s(&staging["api_key"]));
    let staging_id = s(&staging["key_id"]);

    // Verify, with the from-address rule.
    let v = app.verify(&prod_key, Some("John.Doe@AGENCY.gov.sg")).await;
    assert_eq!(v["valid"], json!(true), "{v}");
    assert_eq!(v["account_id"], json!(acc));
    assert_eq!(v["key_id"], json!(prod_id));
    assert_eq!(v["label"], json!("prod"));
    assert_eq!(
        v["from_allowed"],
        json!(false),
        "local part is case-sensitive"
    );
    let v = app.verify(&prod_key, Some(LOGIN)).await;
    assert_eq!(v["from_allowed"], json!(true));
    let v = app
        .verify(&prod_key, Some("donotreply@mail.postman.gov.sg"))
        .await;
    assert_eq!(
        v["from_allowed"],
        json!(true),
        "the default sender is allowed"
    );
    let v = app.verify(&prod_key, Some("someone@else.gov.sg")).await;
    assert_eq!(v["from_allowed"], json!(false));

    // Update contacts.
    let (status, row) = app
        .call(
            Method::PUT,
            &format!("/v1/accounts/{acc}/keys/{staging_id}/contacts"),
            Some(json!({"contacts": ["qa@agency.gov.sg"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{row}");
    assert_eq!(row["contacts"], json!(["qa@agency.gov.sg"]));
    assert_eq!(row["label"], json!("staging"));

    // Rotate prod with a one-hour grace.
    let (status, rotated) = app
        .call(
            Method::POST,
            &format!("/v1/accounts/{acc}/keys/{prod_id}/rotate"),
            Some(json!({"label": "prod-2026", "grace_seconds": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    let new_key = s(&rotated["api_key"]);
    secrets.push(new_key.clone());
    assert_eq!(
        rotated["contacts"], prod["contacts"],
        "the successor keeps the contacts"
    );
    let old_expiry =
        chrono::DateTime::parse_from_rfc3339(&s(&rotated["old_key_expires_at"])).expect("time");
    let created = chrono::DateTime::parse_from_rfc3339(&s(&rotated["created_at"])).expect("time");
    assert_eq!((old_expiry - created).num_seconds(), 3600);
    assert_eq!(
        app.verify(&prod_key, None).await["valid"],
        json!(true),
        "old key works during grace"
    );
    assert_eq!(app.verify(&new_key, None).await["valid"], json!(true));

    // Revoke staging.
    let staging_key = secrets[1].clone();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/accounts/{acc}/keys/{staging_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let v = app.verify(&staging_key, None).await;
    assert_eq!(v, json!({"valid": false, "code": "revoked"}));

    // Migrate a legacy key on another account.
    let legacy_hash = format!("marylim_v1_{}", "abcdefghijklmnopqrstuvwxyz.1234");
    let (status, legacy) = app
        .call(Method::POST, "/v1/accounts/legacy-1/legacy-key", Some(json!({"login_email": "mary.lim@agency.gov.sg", "legacy_hash": legacy_hash, "created_at": "2023-01-01T00:00:00Z"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{legacy}");
    assert_eq!(legacy["label"], json!("default"));
    assert_eq!(legacy["last_five"], json!("*****"));
    assert_eq!(legacy["expires_at"], json!("2024-04-21T00:00:00Z"));
    assert_eq!(legacy["contacts"], json!([]));

    // Unknown and malformed keys.
    let unknown = format!("johndoe_v1_{}", "A".repeat(44));
    assert_eq!(
        app.verify(&unknown, None).await,
        json!({"valid": false, "code": "unknown"})
    );
    assert_eq!(
        app.verify("not a key", None).await,
        json!({"valid": false, "code": "malformed"})
    );

    // The listing: prod (cut to the grace), prod-2026; staging is gone.
    let listing = app.list(acc).await;
    let keys = listing["keys"].as_array().expect("keys");
    let labels: Vec<&str> = keys.iter().filter_map(|k| k["label"].as_str()).collect();
    assert_eq!(labels, vec!["prod", "prod-2026"], "{listing}");
    assert_eq!(keys[0]["expires_at"], rotated["old_key_expires_at"]);
    assert!(keys.iter().all(|k| k["status"] == json!("active")));
    assert!(keys.iter().all(|k| k.get("api_key").is_none()));
    let legacy_listing = app.list("legacy-1").await;
    assert_eq!(
        legacy_listing["keys"][0]["status"],
        json!("expired"),
        "past the legacy cut-off"
    );
    assert_eq!(app.list("nobody").await, json!({"keys": []}));

    // Restart: the same listing, the same verification answers.
    // (Usage aside: what was counted before is flushed on the way out, so it shows after.)
    let without_usage = |mut l: Value| {
        for k in l["keys"].as_array_mut().into_iter().flatten() {
            let row = k.as_object_mut().expect("row");
            row.remove("last_used_at");
            row.remove("verifications_30d");
        }
        l
    };
    let before = without_usage(listing.clone());
    let app = app.restart().await;
    let after = app.list(acc).await;
    assert_eq!(
        without_usage(after.clone()),
        before,
        "listing survives a restart"
    );
    for k in after["keys"].as_array().expect("keys") {
        assert!(
            k["verifications_30d"].as_i64() > Some(0),
            "counted before the restart: {k}"
        );
        assert!(k["last_used_at"].is_string(), "{k}");
    }
    assert_eq!(app.verify(&prod_key, None).await["valid"], json!(true));
    assert_eq!(
        app.verify(&new_key, None).await["key_id"],
        rotated["key_id"]
    );
    assert_eq!(
        app.verify(&staging_key, None).await["code"],
        json!("revoked")
    );
    assert_eq!(app.verify(&unknown, None).await["code"], json!("unknown"));

    // Commands still work after the restart (the aggregate is rebuilt from the store).
    let (status, body) = app.generate(acc, "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CONFLICT, "label still taken: {body}");
    (secrets, app)
}

fn assert_no_secret(haystack: &str, secrets: &[String], what: &str) {
    assert!(!haystack.is_empty(), "{what} should not be empty");
    for secret in secrets {
        assert!(
            !haystack.contains(secret.as_str()),
            "a plaintext key was found in {what}"
        );
        // The secret part alone must not appear either.
        let tail = &secret[secret.len() - 44..];
        assert!(
            !haystack.contains(tail),
            "a key's secret part was found in {what}"
        );
    }
}

#[tokio::test]
async fn postgres_lifecycle_survives_restart_and_keeps_no_secret() {
    let backing = Backing::postgres().await;
    let Backing::Postgres(url) = backing.clone() else {
        unreachable!()
    };
    let (secrets, mut app) = scenario(backing).await;
    app.shutdown().await;
    assert_eq!(secrets.len(), 3);
    assert_no_secret(
        &dump_postgres(&url).await,
        &secrets,
        "the PostgreSQL tables",
    );
    assert_no_secret(&captured_logs(), &secrets, "the logs");
}

#[tokio::test]
async fn embedded_lifecycle_survives_restart_and_keeps_no_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = Backing::embedded(&dir);
    let (secrets, mut app) = scenario(backing).await;
    app.shutdown().await;
    assert_no_secret(
        &dump_files(&dir.path().join("data")),
        &secrets,
        "the SQLite files",
    );
    assert_no_secret(&captured_logs(), &secrets, "the logs");
}

#[tokio::test]
async fn a_key_past_its_expiry_fails_at_once() {
    let backing = Backing::postgres().await;
    let policy = keyledger::domain::Policy::default();
    let clock = std::sync::Arc::new(keyledger::domain::ManualClock::new(chrono::Utc::now()));
    let mut settings = crate::common::settings(&backing, policy);
    settings.clock = clock.clone();
    let app = keyledger::app::Application::build(settings)
        .await
        .expect("builds");
    let addr = app.local_addr().expect("addr");
    let state = app.state.clone();
    tokio::spawn(app.run_until(std::future::pending()));
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{addr}/v1/accounts/a/keys"))
        .bearer_auth(crate::common::TOKEN)
        .json(&json!({"label": "k", "contacts": ["a@agency.gov.sg"], "login_email": LOGIN}))
        .send()
        .await
        .expect("sent");
    let (status, body) = crate::common::read(resp).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let key = s(&body["api_key"]);
    let now = clock.now();
    assert!(state.read_side.verify(&key, None, now).is_ok());
    clock.advance(chrono::Duration::days(200));
    let later = clock.now();
    assert_eq!(
        state.read_side.verify(&key, None, later).err(),
        Some(keyledger::read_side::Rejection::Expired),
        "no KeyExpired event exists, yet the key fails"
    );
    let resp = http
        .get(format!("http://{addr}/v1/accounts/a/keys"))
        .bearer_auth(crate::common::TOKEN)
        .send()
        .await
        .expect("sent");
    let (_, listing) = crate::common::read(resp).await;
    assert_eq!(listing["keys"][0]["status"], json!("expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_legacy_key_verifies_by_postmans_scheme_until_its_cutoff() {
    // Stored as `{username}_v1_{hash without the salt}`, at Postman's cost.
    let (plaintext, salt, tail) = crate::common::postman_legacy_key("marylim", 10);
    let (addr, clock) = crate::common::spawn_with_legacy_cutoff_in_30_days(&salt).await;
    let http = reqwest::Client::new();
    let call = |path: &str, body: Value| {
        http.post(format!("http://{addr}{path}"))
            .bearer_auth(crate::common::TOKEN)
            .json(&body)
            .send()
    };
    let migrated = call(
        "/v1/accounts/legacy-acc/legacy-key",
        json!({"login_email": "mary.lim@agency.gov.sg", "legacy_hash": format!("marylim_v1_{tail}")}),
    )
    .await
    .expect("sent");
    let (status, migrated) = crate::common::read(migrated).await;
    assert_eq!(status, StatusCode::CREATED, "{migrated}");

    let verify = |key: String| {
        let call = &call;
        async move {
            let resp = call(
                "/v1/verify",
                json!({"api_key": key, "from": "mary.lim@agency.gov.sg"}),
            )
            .await
            .expect("sent");
            crate::common::read(resp).await.1
        }
    };
    let v = verify(plaintext.clone()).await;
    assert_eq!(v["valid"], true, "through the bcrypt slow path: {v}");
    assert_eq!(v["key_id"], migrated["key_id"]);
    assert_eq!(v["label"], "default");
    assert_eq!(v["from_allowed"], true);
    assert_eq!(
        verify(plaintext.clone()).await["valid"],
        true,
        "then through the fast path"
    );
    let wrong = format!("marylim_v1_{}", "B".repeat(44));
    assert_eq!(verify(wrong).await["code"], "unknown");
    clock.advance(chrono::Duration::days(31));
    assert_eq!(
        verify(plaintext).await["code"],
        "expired",
        "not after the cut-off"
    );
}
