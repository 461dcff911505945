//! Bad input gets the documented 4xx code and message, and changes nothing; a redelivered
//! command (same Idempotency-Key) changes nothing and gets the same answer.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{Backing, TestApp, LOGIN, TOKEN};

/// (what, method, path, body, expected status, expected code)
type Case = (
    &'static str,
    Method,
    String,
    Option<Value>,
    StatusCode,
    &'static str,
);

fn many_contacts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i}@agency.gov.sg")).collect()
}

#[tokio::test]
async fn bad_input_is_rejected_precisely_and_changes_nothing() {
    let app = TestApp::spawn(Backing::postgres().await).await;
    let (status, prod) = app.generate("acc", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED);
    let prod_id = prod["key_id"].as_str().expect("id").to_owned();
    let (status, other) = app
        .generate("other", "theirs", &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let other_id = other["key_id"].as_str().expect("id").to_owned();
    let events_before = app.event_count().await;
    let listing_before = app.list("acc").await;

    let keys = "/v1/accounts/acc/keys";
    let gen = |label: Value, contacts: Value| json!({"label": label, "contacts": contacts, "login_email": LOGIN});
    let cases: Vec<Case> = vec![
        (
            "empty label",
            Method::POST,
            keys.into(),
            Some(gen(json!(""), json!(["a@agency.gov.sg"]))),
            StatusCode::BAD_REQUEST,
            "invalid_label",
        ),
        (
            "blank label",
            Method::POST,
            keys.into(),
            Some(gen(json!("   "), json!(["a@agency.gov.sg"]))),
            StatusCode::BAD_REQUEST,
            "invalid_label",
        ),
        (
            "oversized label",
            Method::POST,
            keys.into(),
            Some(gen(json!("x".repeat(256)), json!(["a@agency.gov.sg"]))),
            StatusCode::BAD_REQUEST,
            "invalid_label",
        ),
        (
            "duplicate label",
            Method::POST,
            keys.into(),
            Some(gen(json!("prod"), json!(["a@agency.gov.sg"]))),
            StatusCode::CONFLICT,
            "duplicate_label",
        ),
        (
            "invalid email",
            Method::POST,
            keys.into(),
            Some(gen(json!("new"), json!(["not-an-email"]))),
            StatusCode::BAD_REQUEST,
            "invalid_contacts",
        ),
        (
            "duplicate emails",
            Method::POST,
            keys.into(),
            Some(gen(
                json!("new"),
                json!(["a@agency.gov.sg", "a@AGENCY.gov.sg"]),
            )),
            StatusCode::BAD_REQUEST,
            "invalid_contacts",
        ),
        (
            "no contacts",
            Method::POST,
            keys.into(),
            Some(gen(json!("new"), json!([]))),
            StatusCode::BAD_REQUEST,
            "invalid_contacts",
        ),
        (
            "too many contacts",
            Method::POST,
            keys.into(),
            Some(gen(json!("new"), json!(many_contacts(21)))),
            StatusCode::BAD_REQUEST,
            "invalid_contacts",
        ),
        (
            "invalid login email",
            Method::POST,
            keys.into(),
            Some(json!({"label": "new", "contacts": ["a@agency.gov.sg"], "login_email": "nope"})),
            StatusCode::BAD_REQUEST,
            "invalid_login_email",
        ),
        (
            "different login email",
            Method::POST,
            keys.into(),
            Some(
                json!({"label": "new", "contacts": ["a@agency.gov.sg"], "login_email": "someone@agency.gov.sg"}),
            ),
            StatusCode::CONFLICT,
            "login_email_mismatch",
        ),
        (
            "missing field",
            Method::POST,
            keys.into(),
            Some(json!({"label": "new"})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "wrong type",
            Method::POST,
            keys.into(),
            Some(json!({"label": 7, "contacts": "x", "login_email": LOGIN})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "unknown key id",
            Method::PUT,
            format!("{keys}/{}/contacts", uuid::Uuid::new_v4()),
            Some(json!({"contacts": ["a@agency.gov.sg"]})),
            StatusCode::NOT_FOUND,
            "key_not_found",
        ),
        (
            "key id of another account",
            Method::DELETE,
            format!("{keys}/{other_id}"),
            None,
            StatusCode::NOT_FOUND,
            "key_not_found",
        ),
        (
            "key id that is no uuid",
            Method::DELETE,
            format!("{keys}/not-a-uuid"),
            None,
            StatusCode::NOT_FOUND,
            "key_not_found",
        ),
        (
            "invalid contacts on update",
            Method::PUT,
            format!("{keys}/{prod_id}/contacts"),
            Some(json!({"contacts": ["bad@"]})),
            StatusCode::BAD_REQUEST,
            "invalid_contacts",
        ),
        (
            "rotate to a taken label",
            Method::POST,
            format!("{keys}/{prod_id}/rotate"),
            Some(json!({"label": "prod"})),
            StatusCode::CONFLICT,
            "duplicate_label",
        ),
        (
            "negative grace",
            Method::POST,
            format!("{keys}/{prod_id}/rotate"),
            Some(json!({"label": "p2", "grace_seconds": -5})),
            StatusCode::BAD_REQUEST,
            "invalid_grace_period",
        ),
        (
            "bad legacy hash",
            Method::POST,
            "/v1/accounts/acc/legacy-key".into(),
            Some(json!({"login_email": LOGIN, "legacy_hash": "johndoe_v1_short"})),
            StatusCode::BAD_REQUEST,
            "invalid_legacy_hash",
        ),
        (
            "verify without api_key",
            Method::POST,
            "/v1/verify".into(),
            Some(json!({"from": LOGIN})),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "unknown route",
            Method::GET,
            "/v1/nothing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (what, method, path, body, status, code) in cases {
        let (got_status, got) = app.call(method, &path, body).await;
        assert_eq!(got_status, status, "{what}: {got}");
        assert_eq!(got["error"]["code"], json!(code), "{what}: {got}");
        let message = got["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: a human message is required");
    }

    // Malformed JSON, a missing content type, an oversized body.
    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut req = app.http.post(app.url(keys)).bearer_auth(TOKEN).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        req
    };
    for (what, req) in [
        (
            "malformed JSON",
            raw("{\"label\": ", Some("application/json")),
        ),
        (
            "not JSON at all",
            raw("label=prod", Some("application/json")),
        ),
        ("no content type", raw("{}", None)),
    ] {
        let (status, got) = crate::common::read(req.send().await.expect("sent")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {got}");
        assert_eq!(got["error"]["code"], json!("invalid_request"), "{what}");
    }
    let big = "x".repeat(200 * 1024);
    let resp = app
        .http
        .post(app.url(keys))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Missing and wrong tokens.
    for (what, req) in [
        ("missing token", app.http.get(app.url(keys))),
        (
            "wrong token",
            app.http
                .get(app.url(keys))
                .bearer_auth("wrong-token-wrong-token-wrong"),
        ),
        (
            "not bearer",
            app.http
                .get(app.url(keys))
                .header("authorization", format!("Basic {TOKEN}")),
        ),
    ] {
        let (status, got) = crate::common::read(req.send().await.expect("sent")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(got["error"]["code"], json!("unauthorized"), "{what}");
    }
    let health = app.get_open("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK, "health needs no token");

    assert_eq!(
        app.event_count().await,
        events_before,
        "no rejected command recorded anything"
    );
    assert_eq!(
        app.list("acc").await,
        listing_before,
        "the listing did not change"
    );
    let (status, _) = app
        .generate("acc", "after-the-storm", &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::CREATED, "the service keeps working");
}

#[tokio::test]
async fn a_redelivered_command_changes_nothing_and_gets_the_same_answer() {
    let app = TestApp::spawn(Backing::postgres().await).await;
    let command_id = uuid::Uuid::new_v4().to_string();
    let body = json!({"label": "prod", "contacts": ["ops@agency.gov.sg"], "login_email": LOGIN});
    let send = || {
        app.http
            .post(app.url("/v1/accounts/acc/keys"))
            .bearer_auth(TOKEN)
            .header("idempotency-key", &command_id)
            .json(&body)
            .send()
    };
    let first = send().await.expect("sent");
    let (status, first) = crate::common::read(first).await;
    assert_eq!(status, StatusCode::CREATED);
    let events = app.event_count().await;
    for _ in 0..2 {
        let resp = send().await.expect("sent");
        assert_eq!(
            resp.headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        let (status, again) = crate::common::read(resp).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["key_id"], first["key_id"]);
        assert_eq!(again["last_five"], first["last_five"]);
        assert_eq!(again["expires_at"], first["expires_at"]);
        assert!(
            again.get("api_key").is_none(),
            "the plaintext cannot be shown twice"
        );
    }
    assert_eq!(app.event_count().await, events);
    assert_eq!(
        app.list("acc").await["keys"].as_array().map(Vec::len),
        Some(1)
    );

    // The same for a revocation.
    let key_id = first["key_id"].as_str().expect("id");
    let revoke_id = uuid::Uuid::new_v4().to_string();
    for _ in 0..3 {
        let resp = app
            .http
            .delete(app.url(&format!("/v1/accounts/acc/keys/{key_id}")))
            .bearer_auth(TOKEN)
            .header("idempotency-key", &revoke_id)
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(app.event_count().await, events + 1);
}
