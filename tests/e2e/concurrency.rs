//! Concurrency: racing commands on one account, in one process and across two processes
//! sharing the database (cqrs-es optimistic concurrency, retried).

use std::collections::BTreeSet;

use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};

use crate::common::{Backing, TestApp};

async fn race_same_label(a: &TestApp, b: &TestApp, account: &str) {
    let (ra, rb) = tokio::join!(
        a.generate(account, "prod", &["a@agency.gov.sg"]),
        b.generate(account, "prod", &["b@agency.gov.sg"])
    );
    let statuses: BTreeSet<u16> = [ra.0.as_u16(), rb.0.as_u16()].into();
    assert_eq!(statuses, BTreeSet::from([201, 409]), "{ra:?} {rb:?}");
    let loser = if ra.0 == StatusCode::CONFLICT {
        ra.1
    } else {
        rb.1
    };
    assert_eq!(loser["error"]["code"], "duplicate_label");
    assert_eq!(
        a.list(account).await["keys"].as_array().map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn two_generates_with_one_label_yield_exactly_one_key() {
    let backing = Backing::postgres().await;
    let a = TestApp::spawn(backing.clone()).await;
    race_same_label(&a, &a, "one-process").await;
    // Two service instances on one database: the event store's optimistic lock decides.
    let b = TestApp::spawn(backing).await;
    race_same_label(&a, &b, "two-processes").await;
}

#[tokio::test]
async fn fifty_concurrent_commands_on_one_account_are_all_applied() {
    let backing = Backing::postgres().await;
    let a = TestApp::spawn(backing.clone()).await;
    let b = TestApp::spawn(backing.clone()).await;
    let labels: Vec<String> = (0..50).map(|i| format!("key-{i:02}")).collect();
    let results = futures::future::join_all(labels.iter().enumerate().map(|(i, label)| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.generate("busy", label, &["ops@agency.gov.sg"])
    }))
    .await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
    }
    let listing = a.list("busy").await;
    let listed: BTreeSet<String> = listing["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["label"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, labels.iter().cloned().collect::<BTreeSet<_>>());
    let Backing::Postgres(url) = backing else {
        unreachable!()
    };
    let mut c = PgConnection::connect(&url).await.expect("connect");
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = 'busy' ORDER BY sequence",
    )
    .fetch_all(&mut c)
    .await
    .expect("sequences");
    assert_eq!(
        sequences,
        (1..=50).collect::<Vec<i64>>(),
        "contiguous, nothing lost, nothing doubled"
    );
    // Every key verifies on both instances: each learns of the other's commits through
    // LISTEN/NOTIFY (eventually; wait up to 10 s — a correctness check, not a timing one).
    for app in [&a, &b] {
        for (_, body) in &results {
            let key = body["api_key"].as_str().expect("key");
            let mut valid = false;
            for _ in 0..200 {
                valid = app.verify(key, None).await["valid"] == true;
                if valid {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert!(
                valid,
                "a key generated on one instance verifies on the other"
            );
        }
    }
}
