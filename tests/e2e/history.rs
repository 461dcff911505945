//! History as a feature, on PostgreSQL and the real broker: revoked keys in the listing,
//! the listing at four instants, a key's history and its picture, and rotations that end
//! on the successor's first use seen by two instances.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keyledger::config::Roles;
use keyledger::domain::{ManualClock, Policy};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::common::{settings_with, Backing, TestApp};
use crate::kafka;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

/// (label, status, contacts) of each row, in listing order.
fn rows(listing: &Value) -> Vec<(String, String, Value)> {
    listing["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|r| {
            (
                r["label"].as_str().unwrap_or_default().to_owned(),
                r["status"].as_str().unwrap_or_default().to_owned(),
                r["contacts"].clone(),
            )
        })
        .collect()
}

async fn get(app: &TestApp, path: &str) -> Value {
    let (status, body) = app.call(Method::GET, path, None).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_answers_for_inactive_keys_past_listings_and_a_keys_history() {
    let backing = Backing::postgres().await;
    let clock = Arc::new(ManualClock::new(t("2026-06-01T09:00:00Z")));
    let mut settings = settings_with(&backing, Policy::default(), Some(kafka::bus()), Roles::ALL);
    settings.clock = clock.clone();
    let app = TestApp::spawn_settings(backing, settings).await;
    let keys = "/v1/accounts/acct-h/keys";

    // 09:00 generated; 10:00 contacts changed; 11:00 rotated (grace 1 day); 12:00 the old
    // key revoked.
    let (status, body) = app.generate("acct-h", "prod", &["a@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let old = body["key_id"].as_str().expect("id").to_owned();
    clock.set(t("2026-06-01T10:00:00Z"));
    let (status, body) = app
        .call(
            Method::PUT,
            &format!("{keys}/{old}/contacts"),
            Some(json!({"contacts": ["b@agency.gov.sg"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    clock.set(t("2026-06-01T11:00:00Z"));
    let (status, body) = app
        .call(
            Method::POST,
            &format!("{keys}/{old}/rotate"),
            Some(json!({"label": "prod-2", "grace_seconds": 86_400})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let new = body["key_id"].as_str().expect("id").to_owned();
    clock.set(t("2026-06-01T12:00:00Z"));
    let (status, body) = app
        .call(Method::DELETE, &format!("{keys}/{old}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    clock.set(t("2026-06-02T08:00:00Z"));

    // The default listing is as before (the listing table, fed from the events topic): the
    // live key only.
    let mut now = get(&app, keys).await;
    for _ in 0..200 {
        if rows(&now).len() == 1 && now["keys"][0]["label"] == json!("prod-2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = get(&app, keys).await;
    }
    assert_eq!(
        rows(&now),
        vec![("prod-2".into(), "active".into(), json!(["b@agency.gov.sg"]))]
    );
    assert!(now["keys"][0].get("revoked_at").is_none());

    // include=inactive: both, the old one revoked with when and why.
    let all = get(&app, &format!("{keys}?include=inactive")).await;
    assert_eq!(
        rows(&all),
        vec![
            ("prod".into(), "revoked".into(), json!(["b@agency.gov.sg"])),
            ("prod-2".into(), "active".into(), json!(["b@agency.gov.sg"])),
        ]
    );
    assert_eq!(all["keys"][0]["revoked_at"], json!("2026-06-01T12:00:00Z"));
    assert_eq!(all["keys"][0]["revoked_cause"], json!("requested"));

    // as_of at four instants: the four listings.
    let at = |instant: &'static str| {
        let app = &app;
        async move { rows(&get(app, &format!("{keys}?as_of={instant}")).await) }
    };
    assert_eq!(at("2026-06-01T08:59:59Z").await, vec![]);
    assert_eq!(
        at("2026-06-01T09:30:00Z").await,
        vec![("prod".into(), "active".into(), json!(["a@agency.gov.sg"]))]
    );
    assert_eq!(
        at("2026-06-01T10:30:00Z").await,
        vec![("prod".into(), "active".into(), json!(["b@agency.gov.sg"]))]
    );
    let rotated = get(&app, &format!("{keys}?as_of=2026-06-01T11:30:00Z")).await;
    assert_eq!(
        rows(&rotated),
        vec![
            ("prod".into(), "active".into(), json!(["b@agency.gov.sg"])),
            ("prod-2".into(), "active".into(), json!(["b@agency.gov.sg"])),
        ]
    );
    assert_eq!(
        rotated["keys"][0]["expires_at"],
        json!("2026-06-02T11:00:00Z"),
        "the old key's life was cut to the grace"
    );
    assert_eq!(
        at("2026-06-01T12:30:00Z").await,
        vec![("prod-2".into(), "active".into(), json!(["b@agency.gov.sg"]))]
    );
    let both = get(
        &app,
        &format!("{keys}?as_of=2026-06-01T12:30:00Z&include=inactive"),
    )
    .await;
    assert_eq!(both["keys"][0]["status"], json!("revoked"));

    // Bad queries get precise errors.
    for (query, needle) in [
        ("as_of=yesterday", "RFC 3339"),
        ("as_of=2027-01-01T00:00:00Z", "future"),
        ("include=everything", "inactive"),
    ] {
        let (status, body) = app
            .call(Method::GET, &format!("{keys}?{query}"), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], json!("invalid_request"));
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{query}: {body}"
        );
    }

    // The old key's history: every event about it, in order, with its actor.
    let history = get(&app, &format!("{keys}/{old}/history")).await;
    let events: Vec<(String, String, String)> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap_or_default().to_owned(),
                e["occurred_at"].as_str().unwrap_or_default().to_owned(),
                e["actor"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let admin = |ty: &str, at: &str| (ty.to_owned(), at.to_owned(), "admin".to_owned());
    assert_eq!(
        events,
        vec![
            admin("KeyGenerated", "2026-06-01T09:00:00Z"),
            admin("ContactsUpdated", "2026-06-01T10:00:00Z"),
            admin("KeyGenerated", "2026-06-01T11:00:00Z"),
            admin("KeyRotated", "2026-06-01T11:00:00Z"),
            admin("KeyRevoked", "2026-06-01T12:00:00Z"),
        ]
    );
    let sequences: Vec<u64> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
    assert!(
        !history.to_string().contains("key_hash"),
        "the history withholds the key's hash"
    );

    // Its picture: an SVG a parser reads, with every event in it.
    let response = app
        .http
        .get(app.url(&format!("{keys}/{old}/history?format=svg")))
        .bearer_auth(crate::common::TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "image/svg+xml",
        "an SVG"
    );
    let svg = response.text().await.expect("text");
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let drawn: Vec<(String, String)> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("event"))
        .map(|n| {
            (
                n.attribute("data-type").unwrap_or_default().to_owned(),
                n.descendants()
                    .filter_map(|d| d.text())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })
        .collect();
    let types: Vec<&str> = drawn.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        vec![
            "KeyGenerated",
            "ContactsUpdated",
            "KeyGenerated",
            "KeyRotated",
            "KeyRevoked"
        ]
    );
    assert!(
        drawn[1].1.contains("contacts set to b@agency.gov.sg"),
        "{drawn:?}"
    );
    assert!(drawn[4].1.contains("revoked (requested)"), "{drawn:?}");
    assert!(doc
        .descendants()
        .any(|n| n.attribute("class") == Some("grace")));

    // A key the account does not hold: 404; a reader may read history, a verifier not.
    let (status, _) = app
        .call(
            Method::GET,
            &format!("{keys}/{}/history", uuid::Uuid::new_v4()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = app
        .call(Method::GET, &format!("{keys}/{new}/history"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["events"][0]["event_type"], json!("KeyGenerated"));
}

/// Old key `old_api_key`'s verdict on `app`.
async fn valid(app: &TestApp, api_key: &str) -> bool {
    app.verify(api_key, None).await["valid"] == json!(true)
}

/// Waits (up to 20 s) until `app` refuses `api_key`.
async fn until_refused(app: &TestApp, api_key: &str) {
    for _ in 0..400 {
        if !valid(app, api_key).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the key was never refused");
}

/// The KeyRevoked events of `key_id`, as (cause, actor).
async fn revocations(url: &str, key_id: &str) -> Vec<(Option<String>, Option<String>)> {
    let mut c = PgConnection::connect(url).await.expect("connect");
    sqlx::query_as(
        "SELECT payload::jsonb->'KeyRevoked'->>'cause', metadata::jsonb->>'actor' FROM events \
         WHERE event_type = 'KeyRevoked' AND payload::jsonb->'KeyRevoked'->>'key_id' = $1",
    )
    .bind(key_id)
    .fetch_all(&mut c)
    .await
    .expect("events")
}

/// Rotates `key` of `account` on `app` with `revoke_old_on_first_use`; (new id, new key).
async fn rotate_on_first_use(
    app: &TestApp,
    account: &str,
    key: &str,
    label: &str,
) -> (String, String) {
    let (status, body) = app
        .call(
            Method::POST,
            &format!("/v1/accounts/{account}/keys/{key}/rotate"),
            Some(json!({"label": label, "revoke_old_on_first_use": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (
        body["key_id"].as_str().expect("id").to_owned(),
        body["api_key"].as_str().expect("key").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_ends_on_the_first_use_of_its_successor_on_any_instance() {
    let backing = Backing::postgres().await;
    let Backing::Postgres(url) = backing.clone() else {
        unreachable!()
    };
    let bus = kafka::bus();
    let a = TestApp::spawn_bus(backing.clone(), bus.clone(), Roles::ALL).await;
    let b = TestApp::spawn_bus(backing, bus, Roles::parse("http").expect("roles")).await;

    // One rotation, its successor first used on B.
    let (status, body) = a.generate("acct-f", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (old_id, old_key) = (
        body["key_id"].as_str().expect("id").to_owned(),
        body["api_key"].as_str().expect("key").to_owned(),
    );
    let (new_id, new_key) = rotate_on_first_use(&a, "acct-f", &old_id, "prod-2").await;
    assert!(
        valid(&a, &old_key).await,
        "the old key works until the new one is used"
    );
    // B learns of the rotation through the events topic; until then it holds the old key
    // as plainly valid.
    let mut seen = false;
    for _ in 0..200 {
        let listing = b.list("acct-f").await;
        if listing["keys"].as_array().is_some_and(|k| k.len() == 2) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the rotation reached the listing");
    assert!(valid(&b, &old_key).await);
    for _ in 0..200 {
        if b.verify(&new_key, None).await["valid"] == json!(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_refused(&b, &old_key).await;
    until_refused(&a, &old_key).await;
    assert!(valid(&a, &new_key).await && valid(&b, &new_key).await);
    let revoked = revocations(&url, &old_id).await;
    assert_eq!(
        revoked,
        vec![(Some("rotated".into()), Some("first-use".into()))],
        "one revocation, cause rotated, by the first use"
    );
    let all = a
        .call(
            Method::GET,
            "/v1/accounts/acct-f/keys?include=inactive",
            None,
        )
        .await
        .1;
    let old_row = all["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|r| r["key_id"] == json!(old_id))
        .cloned()
        .unwrap_or_default();
    assert_eq!(old_row["revoked_cause"], json!("rotated"), "{all}");
    let _ = new_id;

    // Two instances seeing the first use at the same moment: one revocation.
    let (status, body) = a.generate("acct-g", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (old_id, old_key) = (
        body["key_id"].as_str().expect("id").to_owned(),
        body["api_key"].as_str().expect("key").to_owned(),
    );
    let (_, new_key) = rotate_on_first_use(&a, "acct-g", &old_id, "prod-2").await;
    // Wait until B's index holds the successor (an unknown key verifies as invalid, and
    // verifying it valid would already be its first use) by watching B's listing of it.
    for _ in 0..200 {
        if b.list("acct-g").await["keys"]
            .as_array()
            .is_some_and(|k| k.len() == 2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (va, vb) = tokio::join!(a.verify(&new_key, None), b.verify(&new_key, None));
    assert_eq!(
        (va["valid"].clone(), vb["valid"].clone()),
        (json!(true), json!(true))
    );
    until_refused(&a, &old_key).await;
    until_refused(&b, &old_key).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        revocations(&url, &old_id).await.len(),
        1,
        "however many instances saw the first use, one KeyRevoked"
    );
    let metrics = b.metrics_text().await;
    assert!(
        metrics.contains("keyledger_index_lag_seconds "),
        "each instance tells its index lag"
    );
}

#[tokio::test]
async fn the_embedded_store_answers_the_same_questions() {
    let dir = tempfile::tempdir().expect("dir");
    let app = TestApp::spawn(Backing::embedded(&dir)).await;
    let (status, body) = app.generate("acct-e", "prod", &["ops@agency.gov.sg"]).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["key_id"].as_str().expect("id").to_owned();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/accounts/acct-e/keys/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(app.list("acct-e").await["keys"], json!([]));
    let all = get(&app, "/v1/accounts/acct-e/keys?include=inactive").await;
    assert_eq!(
        rows(&all),
        vec![(
            "prod".into(),
            "revoked".into(),
            json!(["ops@agency.gov.sg"])
        )]
    );
    let history = get(&app, &format!("/v1/accounts/acct-e/keys/{id}/history")).await;
    let types: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(types, vec!["KeyGenerated", "KeyRevoked"]);
    assert_eq!(history["events"][1]["actor"], json!("admin"));
}
