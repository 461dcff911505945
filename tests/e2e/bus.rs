//! The bus end to end: real PostgreSQL, a real Apache Kafka broker, the service
//! in-process or as separate processes that get SIGKILLed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use crypto_box::SecretKey;
use keyledger::config::Roles;
use keyledger_events::chain;
use keyledger_events::decode_event as parse_event;
use keyledger_projections::{Listing, ListingRow};
use rand::rngs::OsRng;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use crate::common::{Backing, TestApp, LOGIN};
use crate::kafka::{self, kill9, produce, spawn_process, Record};

pub(crate) const WAIT: Duration = Duration::from_secs(60);

pub(crate) async fn read_until(
    topic: String,
    done: impl Fn(&[Record]) -> bool + Send + 'static,
) -> Vec<Record> {
    tokio::task::spawn_blocking(move || kafka::read_until(&topic, WAIT, done))
        .await
        .expect("reader")
}

pub(crate) async fn read_quiet(topic: String, settle: Duration) -> Vec<Record> {
    tokio::task::spawn_blocking(move || kafka::read_until(&topic, settle, |_| false))
        .await
        .expect("reader")
}

pub(crate) fn generate_envelope(
    command_id: Uuid,
    account: &str,
    label: &str,
    reply: &str,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "command_id": command_id, "account_id": account, "issued_by": "web-backend",
        "command": {"type": "GenerateKey", "label": label, "contacts": ["ops@agency.gov.sg"], "login_email": LOGIN},
        "reply_public_key": reply
    }))
    .expect("json")
}

pub(crate) fn reply_key() -> (SecretKey, String) {
    let sk = SecretKey::generate(&mut OsRng);
    let pk = STANDARD.encode(sk.public_key().as_bytes());
    (sk, pk)
}

pub(crate) fn results_for(records: &[Record], command_id: Uuid) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r.key == command_id.to_string())
        .map(Record::json)
        .collect()
}

/// The first result of `command_id` on `bus`'s results topic (waits up to [`WAIT`]).
pub(crate) async fn first_result(bus: &keyledger::kafka::BusConfig, command_id: Uuid) -> Value {
    let results = read_until(bus.results_topic(), move |r| {
        !results_for(r, command_id).is_empty()
    })
    .await;
    results_for(&results, command_id)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no result for command {command_id}"))
}

pub(crate) async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn assert_no_plaintext(records: &[Record], secrets: &[String], topic: &str) {
    for r in records {
        let text = String::from_utf8_lossy(&r.value);
        for s in secrets {
            assert!(!text.contains(s.as_str()), "a plaintext key on {topic}");
            assert!(
                !text.contains(&s[s.len() - 44..]),
                "a key's secret part on {topic}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_from_a_plain_producer_yields_its_result_event_and_listing_row() {
    let backing = Backing::postgres().await;
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(backing, bus.clone(), Roles::ALL).await;
    let (sk, pk) = reply_key();
    let command_id = Uuid::new_v4();
    produce(
        &kafka::producer(),
        &bus.commands_topic(),
        "bus-acc",
        &generate_envelope(command_id, "bus-acc", "prod", &pk),
    )
    .await;

    let results = read_until(bus.results_topic(), move |r| {
        !results_for(r, command_id).is_empty()
    })
    .await;
    let result = results_for(&results, command_id).pop().expect("a result");
    assert_eq!(result["status"], "accepted", "{result}");
    assert_eq!(result["account_id"], "bus-acc");
    assert_eq!(result["event_sequences"], json!([1]));
    let sealed = STANDARD
        .decode(result["sealed_api_key"].as_str().expect("sealed key"))
        .expect("base64");
    let api_key =
        String::from_utf8(sk.unseal(&sealed).expect("opens with our private key")).expect("utf-8");
    assert!(api_key.starts_with("johndoe_v1_"));
    let v = app.verify(&api_key, None).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["key_id"], result["key_id"]);

    let events = read_until(bus.events_topic(), |r| !r.is_empty()).await;
    let e = events[0].json();
    assert_eq!(events[0].key, "bus-acc", "keyed by account");
    assert_eq!(e["account_id"], "bus-acc");
    assert_eq!(e["sequence"], 1);
    assert_eq!(e["event_type"], "KeyGenerated");
    assert_eq!(e["event_version"], "1");
    assert_eq!(e["command_id"], json!(command_id));
    assert!(Uuid::parse_str(e["event_id"].as_str().expect("event id")).is_ok());
    assert!(e["occurred_at"].is_string());
    assert_eq!(e["payload"]["label"], "prod");
    assert_eq!(e["payload"]["key_id"], result["key_id"]);
    assert_eq!(e["payload"]["key_hash"].as_str().map(str::len), Some(64));
    assert_eq!(
        e["payload"]["last_five"].as_str(),
        Some(&api_key[api_key.len() - 5..])
    );
    let record = parse_event(&events[0].value).expect("parses");
    let expected_chain = chain::next(&chain::GENESIS, "bus-acc", 1, &record.event);
    assert_eq!(e["chain"], chain::to_hex(&expected_chain));

    wait_for("the listing row", || async {
        app.list("bus-acc").await["keys"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    assert_eq!(app.list("bus-acc").await["keys"][0]["label"], "prod");

    // Nothing on the results or events topics holds the key.
    let results = read_quiet(bus.results_topic(), Duration::from_secs(1)).await;
    let events = read_quiet(bus.events_topic(), Duration::from_secs(1)).await;
    assert_no_plaintext(
        &results,
        std::slice::from_ref(&api_key),
        "the results topic",
    );
    assert_no_plaintext(&events, &[api_key], "the events topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_parsed_goes_to_the_dead_letters_and_consumption_continues() {
    let backing = Backing::postgres().await;
    let mut bus = kafka::bus();
    bus.max_command_bytes = 64 * 1024;
    let _app = TestApp::spawn_bus(backing, bus.clone(), Roles::ALL).await;
    let p = kafka::producer();
    let topic = bus.commands_topic();
    produce(&p, &topic, "a", b"{not json").await;
    produce(&p, &topic, "a", br#"{"command_id":"7d1c2d4e-1b2a-4c3d-8e9f-0a1b2c3d4e5f","account_id":"a","command":{"type":"DropAllKeys"}}"#).await;
    produce(&p, &topic, "a", br#"{"account_id":"a","command":{"type":"RevokeKey","key_id":"7d1c2d4e-1b2a-4c3d-8e9f-0a1b2c3d4e5f"}}"#).await;
    // Over the command limit (64 KiB here), and far over it.
    produce(&p, &topic, "a", &vec![b'x'; 100 * 1024]).await;
    produce(&p, &topic, "a", &vec![b'{'; 900 * 1024]).await;
    let (_, pk) = reply_key();
    let valid = Uuid::new_v4();
    produce(
        &p,
        &topic,
        "a",
        &generate_envelope(valid, "a", "after-the-junk", &pk),
    )
    .await;

    let dead = read_until(bus.dead_letters_topic(), |r| r.len() >= 5).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| d.json()["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(dead.len(), 5, "one dead letter per bad value: {reasons:?}");
    assert!(reasons[0].contains("unparseable"), "{reasons:?}");
    assert!(reasons[1].contains("unknown variant"), "{reasons:?}");
    assert!(reasons[2].contains("command_id"), "{reasons:?}");
    assert!(reasons[3].contains("oversized"), "{reasons:?}");
    assert!(reasons[4].contains("oversized"), "{reasons:?}");
    assert_eq!(dead[4].json()["offset"], 4);
    let first = dead[0].json();
    assert_eq!(
        STANDARD
            .decode(first["original"].as_str().expect("original"))
            .expect("b64"),
        b"{not json"
    );
    assert_eq!(first["topic"], json!(topic));
    assert!(first["offset"].is_i64());
    let results = read_until(bus.results_topic(), move |r| {
        !results_for(r, valid).is_empty()
    })
    .await;
    assert_eq!(results_for(&results, valid)[0]["status"], "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_three_times_has_one_effect_and_three_results() {
    let backing = Backing::postgres().await;
    let bus = kafka::bus();
    let _app = TestApp::spawn_bus(backing, bus.clone(), Roles::ALL).await;
    let (_, pk) = reply_key();
    let command_id = Uuid::new_v4();
    let envelope = generate_envelope(command_id, "thrice", "once", &pk);
    let p = kafka::producer();
    for _ in 0..3 {
        produce(&p, &bus.commands_topic(), "thrice", &envelope).await;
    }
    let results = read_until(bus.results_topic(), move |r| {
        results_for(r, command_id).len() >= 3
    })
    .await;
    let statuses: Vec<String> = results_for(&results, command_id)
        .iter()
        .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(statuses, vec!["accepted", "duplicate", "duplicate"]);
    let all = results_for(&results, command_id);
    // A redelivery answers with the same sealed box (the sender may never have seen the
    // first answer); nothing new is minted.
    assert!(all[0]["sealed_api_key"].is_string());
    assert_eq!(all[1]["sealed_api_key"], all[0]["sealed_api_key"]);
    assert_eq!(all[2]["sealed_api_key"], all[0]["sealed_api_key"]);
    assert_eq!(all[1]["key_id"], all[0]["key_id"]);
    let events = read_quiet(bus.events_topic(), Duration::from_secs(3)).await;
    assert_eq!(events.len(), 1, "one effect");
}

/// (account, sequence) of every event record, in topic order per partition.
fn positions(records: &[Record]) -> Vec<(String, u64)> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    sorted
        .iter()
        .map(|r| {
            let j = r.json();
            (
                j["account_id"].as_str().unwrap_or_default().to_owned(),
                j["sequence"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Per account, the sequences in topic order: each must be 1..=n, ascending.
fn assert_ordered(records: &[Record], expected_per_account: u64, allow_duplicates: bool) {
    let mut per: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (a, s) in positions(records) {
        per.entry(a).or_default().push(s);
    }
    for (account, seqs) in per {
        let mut seen = seqs.clone();
        if allow_duplicates {
            seen.dedup();
            let unique: BTreeSet<u64> = seqs.iter().copied().collect();
            assert_eq!(
                unique,
                (1..=expected_per_account).collect(),
                "{account}: every event present"
            );
        } else {
            assert_eq!(
                seen,
                (1..=expected_per_account).collect::<Vec<_>>(),
                "{account}: exactly once, in order"
            );
        }
        let mut max = 0;
        for s in &seqs {
            assert!(*s >= max || allow_duplicates, "{account}: out of order");
            max = max.max(*s);
        }
    }
}

async fn generate_many(app: &TestApp, accounts: usize, per_account: usize, tasks: usize) {
    let jobs: Vec<(String, String)> = (0..per_account)
        .flat_map(|k| (0..accounts).map(move |a| (format!("acct-{a:03}"), format!("key-{k:03}"))))
        .collect();
    let chunks: Vec<Vec<(String, String)>> = jobs
        .chunks(jobs.len().div_ceil(tasks))
        .map(<[_]>::to_vec)
        .collect();
    futures::future::join_all(chunks.into_iter().map(|chunk| async move {
        for (account, label) in chunk {
            let (status, body) = app.generate(&account, &label, &["ops@agency.gov.sg"]).await;
            assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
        }
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_commands_are_published_exactly_once_in_order() {
    let backing = Backing::postgres().await;
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(backing, bus.clone(), Roles::ALL).await;
    generate_many(&app, 50, 20, 8).await;
    let events = read_until(bus.events_topic(), |r| r.len() >= 1000).await;
    let events = {
        // Give a straggler duplicate the chance to show up.
        let more = read_quiet(bus.events_topic(), Duration::from_secs(2)).await;
        if more.len() > events.len() {
            more
        } else {
            events
        }
    };
    assert_eq!(events.len(), 1000, "each committed event exactly once");
    assert_ordered(&events, 20, false);
}

/// The listing as a fresh replay of the topic would build it.
fn replay(records: &[Record]) -> Vec<ListingRow> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut listing = Listing::default();
    for r in sorted {
        let e = parse_event(&r.value).expect("readable event");
        listing.apply(&e.account_id, e.sequence, &e.event);
    }
    listing.all_rows()
}

async fn listing_table(url: &str) -> Vec<ListingRow> {
    let mut c = PgConnection::connect(url).await.expect("connect");
    let rows = sqlx::query(
        "SELECT account_id, key_id, label, last_five, contacts, created_at, expires_at, status FROM key_listing \
         ORDER BY account_id, created_at, key_id",
    )
    .fetch_all(&mut c)
    .await
    .expect("rows");
    rows.iter()
        .map(|r| ListingRow {
            account_id: r.get("account_id"),
            key_id: r.get("key_id"),
            label: r.get("label"),
            last_five: r.get("last_five"),
            contacts: r.get("contacts"),
            created_at: r.get("created_at"),
            expires_at: r.get("expires_at"),
            status: keyledger_projections::KeyStatus::parse(r.get("status")).expect("status"),
            revoked: None,
        })
        .collect()
}

/// The listing table once it equals `expected`, or as it is after 30 s.
async fn listing_once_caught_up(url: &str, expected: &[ListingRow]) -> Vec<ListingRow> {
    let mut last = Vec::new();
    for _ in 0..300 {
        last = listing_table(url).await;
        if last == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

async fn listed(db: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM key_listing")
        .fetch_one(db)
        .await
        .expect("count")
}

/// A fresh database and topics, and the service in-process running `roles` (the part under
/// test runs as a separate process).
async fn spawn_without_one_part(roles: &str) -> (String, keyledger::kafka::BusConfig, TestApp) {
    let backing = Backing::postgres().await;
    let Backing::Postgres(url) = backing.clone() else {
        unreachable!()
    };
    let bus = kafka::bus();
    let app = TestApp::spawn_bus(backing, bus.clone(), Roles::parse(roles).expect("roles")).await;
    (url, bus, app)
}

async fn outbox(db: &mut PgConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(db)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_publish_loses_nothing_and_duplicates_change_no_projection() {
    let (url, bus, app) = spawn_without_one_part("http,commands,projector").await;
    // 300 events wait in the outbox; a relay publishing one at a time is killed as soon as
    // it has taken some of them, with most still to go.
    generate_many(&app, 20, 15, 4).await;
    let mut small_batches = bus.clone();
    small_batches.relay_batch = 1;
    let mut db = PgConnection::connect(&url).await.expect("connect");
    assert_eq!(outbox(&mut db).await, 300);
    let mut relay = spawn_process(&url, &small_batches, "relay").await;
    let mut left = 300;
    for _ in 0..60_000 {
        left = outbox(&mut db).await;
        if left < 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    kill9(&mut relay).await;
    let left_at_kill = outbox(&mut db).await;
    assert!(
        left < 300 && left_at_kill > 0,
        "killed in the middle of publishing ({left_at_kill} left)"
    );
    let mut relay = spawn_process(&url, &bus, "relay").await;
    let events = read_until(bus.events_topic(), |r| {
        let unique: BTreeSet<(String, u64)> = positions(r).into_iter().collect();
        unique.len() >= 300
    })
    .await;
    assert_ordered(&events, 15, true);
    let expected = replay(&events);
    assert_eq!(expected.len(), 300);
    let last = listing_once_caught_up(&url, &expected).await;
    assert_eq!(last, expected, "the listing equals a replay of the topic");
    kill9(&mut relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_resumes_to_the_same_listing_as_a_fresh_replay() {
    let (url, bus, app) = spawn_without_one_part("http,commands,relay").await;
    generate_many(&app, 20, 15, 4).await;
    // Revoke, rotate and re-contact some, so the replay has more than inserts.
    let mut ids = Vec::new();
    let mut plaintexts = Vec::new();
    for label in ["a", "b", "c"] {
        let (status, body) = app.generate("extra", label, &["ops@agency.gov.sg"]).await;
        assert_eq!(status, reqwest::StatusCode::CREATED);
        ids.push(body["key_id"].as_str().expect("id").to_owned());
        plaintexts.push(body["api_key"].as_str().expect("key").to_owned());
    }
    let base = "/v1/accounts/extra/keys";
    let calls = [
        (reqwest::Method::DELETE, format!("{base}/{}", ids[0]), None),
        (
            reqwest::Method::POST,
            format!("{base}/{}/rotate", ids[1]),
            Some(json!({"label": "b2"})),
        ),
        (
            reqwest::Method::PUT,
            format!("{base}/{}/contacts", ids[2]),
            Some(json!({"contacts": ["new@agency.gov.sg"]})),
        ),
    ];
    for (method, path, body) in calls {
        let (status, answer) = app.call(method, &path, body).await;
        assert!(status.is_success(), "{answer}");
    }
    // Wait until all 307 events are on the topic, then let a projector applying 7 records
    // per transaction start, and kill it as soon as its first transactions are in.
    let events = read_until(bus.events_topic(), |r| r.len() >= 307).await;
    let mut small_batches = bus.clone();
    small_batches.projector_batch = 7;
    let mut db = PgConnection::connect(&url).await.expect("connect");
    let mut projector = spawn_process(&url, &small_batches, "projector").await;
    for _ in 0..60_000 {
        if listed(&mut db).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    kill9(&mut projector).await;
    let partial = listed(&mut db).await;
    assert!(
        partial > 0 && partial < 303,
        "killed mid-way ({partial} rows)"
    );
    let mut projector = spawn_process(&url, &bus, "projector").await;
    assert_eq!(replay(&events).len(), 303);
    let expected = replay(&events);
    let last = listing_once_caught_up(&url, &expected).await;
    assert_eq!(
        last, expected,
        "the listing equals a fresh replay (killed after {partial} rows)"
    );
    let counts: HashMap<String, usize> = expected.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.account_id.clone()).or_default() += 1;
        m
    });
    assert_eq!(counts.len(), 21);

    // The persisted verification index holds every key, the revoked one as revoked.
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM verification_index")
        .fetch_all(&mut db)
        .await
        .expect("index rows");
    assert_eq!(statuses.len(), 304, "300 + a, b, c + b2");
    assert_eq!(statuses.iter().filter(|s| *s == "revoked").count(), 1);

    // A restarting instance's index (its snapshot, then what the store holds past it)
    // answers as the running one does.
    let store = keyledger::store::Store::connect_postgres(&url, 2)
        .await
        .expect("store");
    let hasher = keyledger::domain::KeyHasher::new(crate::common::PEPPER.as_bytes());
    let read_side = keyledger::read_side::ReadSide::new(hasher, None);
    let heads = store.account_heads().await.expect("heads");
    read_side.start(&store, &heads).await.expect("starts");
    assert_eq!(read_side.index_stats().keys, 304, "300 + a, b, c + b2");
    let now = chrono::Utc::now();
    assert_eq!(
        read_side.verify(&plaintexts[0], None, now).err(),
        Some(keyledger::read_side::Rejection::Revoked)
    );
    assert!(
        read_side.verify(&plaintexts[1], None, now).is_ok(),
        "b is in its grace period"
    );
    assert!(read_side.verify(&plaintexts[2], None, now).is_ok());
    kill9(&mut projector).await;
}
