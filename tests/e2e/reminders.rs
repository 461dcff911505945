//! The reminder saga, automatic expiry and email notifications, end to end: real
//! PostgreSQL, the real broker, a manual clock, and a real SMTP server on 127.0.0.1 that
//! counts what it receives.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use keyledger::config::{ReminderSettings, Roles};
use keyledger::domain::{ManualClock, Policy};
use keyledger::notify::dispatch::Smtp;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::common::{settings_with, Backing, TestApp, LOGIN};
use crate::kafka;
use crate::smtp::{Mail, SmtpSink};

const WAIT: Duration = Duration::from_secs(30);
/// After a restart the new consumers must first join their groups (a killed member's
/// partitions move only after its session timeout).
const WAIT_AFTER_RESTART: Duration = Duration::from_secs(60);
/// How long "nothing more arrives" is watched for: many saga ticks and notifier polls.
const QUIET: Duration = Duration::from_millis(2500);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 0, 0, 0)
        .single()
        .expect("valid")
}

fn minute() -> chrono::Duration {
    chrono::Duration::minutes(1)
}

fn days(n: i64) -> chrono::Duration {
    chrono::Duration::days(n)
}

pub(crate) fn fast_reminders(smtp: &SmtpSink) -> ReminderSettings {
    ReminderSettings {
        tick: Duration::from_millis(50),
        poll: Duration::from_millis(50),
        smtp: Some(
            Smtp::new(
                &smtp.url(),
                "Postman <donotreply@mail.postman.gov.sg>",
                Duration::from_millis(100),
                Duration::from_millis(800),
            )
            .expect("smtp settings"),
        ),
        ..ReminderSettings::default()
    }
}

struct World {
    app: TestApp,
    clock: Arc<ManualClock>,
    smtp: SmtpSink,
    database: String,
}

/// The whole service on PostgreSQL (with the bus or not) on a manual clock at t0, mailing
/// its own SMTP server.
async fn world_with(bus: bool, policy: Policy) -> World {
    world_on(Backing::postgres().await, bus, policy).await
}

async fn world_on(backing: Backing, bus: bool, policy: Policy) -> World {
    let smtp = SmtpSink::start().await;
    let database = match &backing {
        Backing::Postgres(url) => url.clone(),
        Backing::Embedded(_) => String::new(),
    };
    let clock = Arc::new(ManualClock::new(t0()));
    let mut settings = settings_with(&backing, policy, bus.then(kafka::bus), Roles::ALL);
    settings.clock = clock.clone();
    settings.reminders = fast_reminders(&smtp);
    settings.usage_flush = Some(Duration::from_millis(200));
    let app = TestApp::spawn_settings(backing, settings).await;
    World {
        app,
        clock,
        smtp,
        database,
    }
}

async fn world() -> World {
    world_with(true, Policy::default()).await
}

struct Key {
    id: String,
    api_key: String,
    expires_at: DateTime<Utc>,
}

async fn generate(app: &TestApp, account: &str, label: &str, contacts: &[&str]) -> Key {
    let (status, body) = app.generate(account, label, contacts).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    Key {
        id: body["key_id"].as_str().expect("key id").to_owned(),
        api_key: body["api_key"].as_str().expect("key").to_owned(),
        expires_at: body["expires_at"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("expiry"),
    }
}

fn summary(mails: &[Mail]) -> Vec<(String, String)> {
    let mut v: Vec<_> = mails
        .iter()
        .flat_map(|m| m.to.iter().map(|to| (to.clone(), m.subject())))
        .collect();
    v.sort();
    v
}

const FOUR_WEEKS: &str = "Reminder: Your Postman API key will expire in four weeks!";
const TWO_WEEKS: &str = "Reminder: Your Postman API key will expire in two weeks!";
const THREE_DAYS: &str = "URGENT: Your Postman API key will expire in three days!";
const ONE_DAY: &str = "URGENT: Your Postman API key will expire in one day!";
const EXPIRED: &str = "Your Postman API key has expired";

impl World {
    /// Moves the clock and waits until `total` emails have arrived.
    async fn at(&self, when: DateTime<Utc>, total: usize) -> Vec<Mail> {
        self.clock.set(when);
        let mails = self.smtp.wait_for(WAIT, |m| m.len() >= total).await;
        assert!(
            mails.len() >= total,
            "expected {total} emails by {when}, got {:?}",
            summary(&mails)
        );
        mails
    }

    /// Waits a while and checks that exactly `total` emails arrived in all.
    async fn exactly(&self, total: usize) -> Vec<Mail> {
        tokio::time::sleep(QUIET).await;
        let mails = self.smtp.mails();
        assert_eq!(mails.len(), total, "{:?}", summary(&mails));
        mails
    }

    async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database)
            .await
            .expect("connect")
    }

    async fn upcoming(&self, query: &str) -> Vec<Value> {
        let (status, body) = self
            .app
            .call(Method::GET, &format!("/v1/reminders?{query}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["reminders"].as_array().cloned().unwrap_or_default()
    }

    /// The operator view once `done` holds (the saga follows the log, so it trails).
    async fn upcoming_when(&self, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut rows = Vec::new();
        for _ in 0..600 {
            rows = self.upcoming(query).await;
            if done(&rows) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rows
    }
}

fn last(mails: &[Mail], n: usize) -> Vec<(String, String)> {
    summary(&mails[mails.len() - n..])
}

fn pair(to: &str, subject: &str) -> (String, String) {
    (to.to_owned(), subject.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_once_to_the_contacts_of_that_moment_then_the_expiry() {
    let w = world().await;
    let key = generate(&w.app, "acc-life", "prod", &["ops@agency.gov.sg"]).await;
    let e = key.expires_at;
    // Used once (the usage table has it within a flush): the reminders will say so.
    assert_eq!(w.app.verify(&key.api_key, None).await["valid"], json!(true));
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The operator view: four stages and the expiry ahead, with their recipients.
    let ahead = w
        .upcoming_when("account_id=acc-life&days=400", |r| r.len() == 5)
        .await;
    let stages: Vec<_> = ahead.iter().map(|r| r["stage"].clone()).collect();
    assert_eq!(
        stages,
        vec![json!(28), json!(14), json!(3), json!(1), Value::Null]
    );
    assert_eq!(ahead[0]["recipients"], json!(["ops@agency.gov.sg"]));
    assert_eq!(
        ahead[0]["due_at"]
            .as_str()
            .map(|s| s.parse::<DateTime<Utc>>().ok()),
        Some(Some(e - days(28)))
    );

    // Months pass with nothing due.
    w.clock.set(t0() + days(60));
    w.exactly(0).await;

    let mails = w.at(e - days(28) + minute(), 1).await;
    assert_eq!(summary(&mails), vec![pair("ops@agency.gov.sg", FOUR_WEEKS)]);
    let body = &mails[0].body();
    assert!(body.contains("prod") && body.contains(LOGIN), "{body}");
    assert!(body.contains("It was last used on "), "{body}");

    // New contacts between two stages: the later reminders go to them.
    let (status, body) = w
        .app
        .call(
            Method::PUT,
            &format!("/v1/accounts/acc-life/keys/{}/contacts", key.id),
            Some(json!({"contacts": ["a@agency.gov.sg", "b@agency.gov.sg"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Let the contacts change reach the saga before the next stage falls due.
    w.upcoming_when("account_id=acc-life&days=400", |r| {
        r.first().map(|r| r["recipients"].clone())
            == Some(json!(["a@agency.gov.sg", "b@agency.gov.sg"]))
    })
    .await;

    let mails = w.at(e - days(14) + minute(), 3).await;
    assert_eq!(
        last(&mails, 2),
        vec![
            pair("a@agency.gov.sg", TWO_WEEKS),
            pair("b@agency.gov.sg", TWO_WEEKS)
        ]
    );
    let mails = w.at(e - days(3) + minute(), 5).await;
    assert_eq!(
        last(&mails, 2),
        vec![
            pair("a@agency.gov.sg", THREE_DAYS),
            pair("b@agency.gov.sg", THREE_DAYS)
        ]
    );
    let mails = w.at(e - days(1) + minute(), 7).await;
    assert_eq!(
        last(&mails, 2),
        vec![
            pair("a@agency.gov.sg", ONE_DAY),
            pair("b@agency.gov.sg", ONE_DAY)
        ]
    );
    assert!(
        mails[6].body().contains("last reminder"),
        "{}",
        mails[6].body()
    );
    let mails = w.at(e + minute(), 9).await;
    assert_eq!(
        last(&mails, 2),
        vec![
            pair("a@agency.gov.sg", EXPIRED),
            pair("b@agency.gov.sg", EXPIRED)
        ]
    );

    // After expiry: verify rejects the key and the listing says expired.
    let verdict = w.app.verify(&key.api_key, None).await;
    assert_eq!(verdict, json!({"valid": false, "code": "expired"}));
    let mut status = Value::Null;
    for _ in 0..100 {
        status = w.app.list("acc-life").await["keys"][0]["status"].clone();
        if status == "expired" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "expired");

    // Exactly once: nine emails, nine different (recipient, subject) pairs, each with its
    // own Message-ID; the log holds four reminder decisions and one expiry.
    let mails = w.exactly(9).await;
    assert_eq!(
        summary(&mails).into_iter().collect::<BTreeSet<_>>().len(),
        9
    );
    let ids: BTreeSet<_> = mails
        .iter()
        .filter_map(|m| m.header("Message-ID"))
        .collect();
    assert_eq!(ids.len(), 9);
    let mut db = w.db().await;
    let decided: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, count(*) FROM events GROUP BY event_type ORDER BY event_type",
    )
    .fetch_all(&mut db)
    .await
    .expect("events");
    assert!(
        decided.contains(&("ExpiryReminderDue".into(), 4)),
        "{decided:?}"
    );
    assert!(decided.contains(&("KeyExpired".into(), 1)), "{decided:?}");
    assert!(w.upcoming("account_id=acc-life&days=400").await.is_empty());

    // The notifications topic carries the same nine, once each.
    let topic = w.app.bus.as_ref().expect("bus").notifications_topic();
    let records =
        tokio::task::spawn_blocking(move || kafka::read_until(&topic, WAIT, |r| r.len() >= 9))
            .await
            .expect("reader");
    let ids: BTreeSet<_> = records
        .iter()
        .map(|r| r.json()["notification_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 9, "{records:?}");
    assert!(records.iter().all(|r| r.key == "acc-life"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_hear_nothing_more_and_rotated_keys_only_inside_their_grace() {
    let w = world().await;
    let k1 = generate(&w.app, "acc-rr", "one", &["r1@agency.gov.sg"]).await;
    let k2 = generate(&w.app, "acc-rr", "two", &["r2@agency.gov.sg"]).await;
    let e = k1.expires_at;
    let at28 = e - days(28) + minute();
    let mails = w.at(at28, 2).await;
    assert_eq!(
        summary(&mails),
        vec![
            pair("r1@agency.gov.sg", FOUR_WEEKS),
            pair("r2@agency.gov.sg", FOUR_WEEKS)
        ]
    );

    let (status, _) = w
        .app
        .call(
            Method::DELETE,
            &format!("/v1/accounts/acc-rr/keys/{}", k1.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Rotate with three days of grace: the old key's 3-day stage is due at once.
    let (status, rotated) = w
        .app
        .call(
            Method::POST,
            &format!("/v1/accounts/acc-rr/keys/{}/rotate", k2.id),
            Some(json!({"label": "two-b", "grace_seconds": 3 * 86_400})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated}");
    let new_id = rotated["key_id"].as_str().expect("new id").to_owned();
    let mails = w.at(at28, 3).await;
    assert_eq!(last(&mails, 1), vec![pair("r2@agency.gov.sg", THREE_DAYS)]);
    let mails = w.at(at28 + days(2), 4).await;
    assert_eq!(last(&mails, 1), vec![pair("r2@agency.gov.sg", ONE_DAY)]);
    let mails = w.at(at28 + days(3), 5).await;
    assert_eq!(last(&mails, 1), vec![pair("r2@agency.gov.sg", EXPIRED)]);

    // The original schedule's later stages: nothing for the revoked key, nothing more for
    // the rotated one; the new key keeps its own full schedule.
    w.clock.set(e - days(1) + minute());
    w.exactly(5).await;
    let ahead = w
        .upcoming_when("account_id=acc-rr&days=400", |r| {
            r.iter().all(|r| r["key_id"] == new_id.as_str())
        })
        .await;
    assert!(
        ahead.iter().all(|r| r["key_id"] == new_id.as_str()),
        "{ahead:?}"
    );
    let stages: Vec<_> = ahead.iter().map(|r| r["stage"].clone()).collect();
    assert_eq!(
        stages,
        vec![json!(28), json!(14), json!(3), json!(1), Value::Null]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_across_two_stages_only_the_latest_is_sent() {
    let mut w = world().await;
    let key = generate(&w.app, "acc-down", "prod", &["ops@agency.gov.sg"]).await;
    // Let the saga schedule the key, then stop everything.
    w.upcoming_when("account_id=acc-down&days=400", |r| !r.is_empty())
        .await;
    w.app.shutdown().await;
    // Down while the 28- and 14-day stages fall due.
    w.clock.set(key.expires_at - days(10));
    w.app = w.app.restart().await;
    let mails = w.smtp.wait_for(WAIT_AFTER_RESTART, |m| !m.is_empty()).await;
    assert_eq!(summary(&mails), vec![pair("ops@agency.gov.sg", TWO_WEEKS)]);
    w.exactly(1).await;
    let mut db = w.db().await;
    let payload: String = sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE event_type = 'ExpiryReminderDue'",
    )
    .fetch_one(&mut db)
    .await
    .expect("one reminder decided");
    let payload: Value = serde_json::from_str(&payload).expect("json");
    let due = &payload["ExpiryReminderDue"];
    assert_eq!(due["stage"], 14);
    assert_eq!(due["skipped_stages"], json!([28]), "{payload}");
    // The skipped stage is never sent later, and the next one still is.
    let mails = w.at(key.expires_at - days(3) + minute(), 2).await;
    assert_eq!(last(&mails, 1), vec![pair("ops@agency.gov.sg", THREE_DAYS)]);
    w.exactly(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_retries_with_backoff_and_delivers_once_it_is_up() {
    let mut w = world().await;
    w.smtp.stop();
    let key = generate(&w.app, "acc-smtp", "prod", &["ops@agency.gov.sg"]).await;
    w.clock.set(key.expires_at - days(28) + minute());
    // The delivery fails and is retried with backoff.
    let mut db = w.db().await;
    let mut attempts = 0i64;
    for _ in 0..300 {
        attempts = sqlx::query_scalar("SELECT COALESCE(max(attempts), 0) FROM notifications")
            .fetch_one(&mut db)
            .await
            .expect("attempts");
        if attempts >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(attempts >= 3, "only {attempts} attempts");
    let last_error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM notifications LIMIT 1")
            .fetch_one(&mut db)
            .await
            .expect("error");
    assert!(last_error.is_some());
    // The rest of the service does not notice.
    let other = generate(&w.app, "acc-smtp", "other", &["ops@agency.gov.sg"]).await;
    assert_eq!(w.app.verify(&other.api_key, None).await["valid"], true);

    w.smtp.resume().await;
    let mails = w.smtp.wait_for(WAIT, |m| !m.is_empty()).await;
    assert_eq!(summary(&mails), vec![pair("ops@agency.gov.sg", FOUR_WEEKS)]);
    w.exactly(1).await;
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE delivered_ms IS NOT NULL")
            .fetch_one(&mut db)
            .await
            .expect("delivered");
    assert_eq!(delivered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_bus_a_legacy_key_reminds_its_login_email() {
    // PostgreSQL alone: the saga and the notifier follow the event store.
    legacy_key_reminds_its_login_email(Backing::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_legacy_key_reminds_its_login_email() {
    let dir = tempfile::tempdir().expect("tempdir");
    legacy_key_reminds_its_login_email(Backing::embedded(&dir)).await;
}

async fn legacy_key_reminds_its_login_email(backing: Backing) {
    let policy = Policy {
        legacy_expiry: t0() + days(10),
        ..Policy::default()
    };
    let w = world_on(backing, false, policy).await;
    let (status, body) = w
        .app
        .call(
            Method::POST,
            "/v1/accounts/acc-legacy/legacy-key",
            Some(json!({"login_email": "owner@agency.gov.sg", "legacy_hash": format!("owner_v1_{:031}", 1)})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Migrated ten days before its expiry: only the 3- and 1-day stages are ahead.
    let ahead = w
        .upcoming_when("account_id=acc-legacy&days=400", |r| !r.is_empty())
        .await;
    let stages: Vec<_> = ahead.iter().map(|r| r["stage"].clone()).collect();
    assert_eq!(stages, vec![json!(3), json!(1), Value::Null], "{ahead:?}");
    let expiry = t0() + days(10);
    let mails = w.at(expiry - days(3) + minute(), 1).await;
    assert_eq!(
        summary(&mails),
        vec![pair("owner@agency.gov.sg", THREE_DAYS)]
    );
    assert!(mails[0].body().contains("*****"));
    let mails = w.at(expiry - days(1) + minute(), 2).await;
    assert_eq!(last(&mails, 1), vec![pair("owner@agency.gov.sg", ONE_DAY)]);
    let mails = w.at(expiry + minute(), 3).await;
    assert_eq!(last(&mails, 1), vec![pair("owner@agency.gov.sg", EXPIRED)]);
    w.exactly(3).await;
}

async fn count(db: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.expect("count")
}

async fn until_count(db: &mut PgConnection, sql: &str, at_least: i64) {
    // A restarted member may wait out the killed one's session and a rejoin.
    for _ in 0..600 {
        if count(db, sql).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {sql} >= {at_least}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_and_notifier_killed_around_a_due_time_lose_nothing_and_repeat_nothing() {
    // Real processes on the real clock: a legacy key expiring a day and 20 s from now has
    // its one-day stage due 20 s from now (its earlier stages were over before migration).
    let smtp = SmtpSink::start().await;
    let backing = Backing::postgres().await;
    let Backing::Postgres(database) = backing.clone() else {
        unreachable!()
    };
    let bus = kafka::bus();
    let due = Utc::now() + chrono::Duration::seconds(20);
    let policy = Policy {
        legacy_expiry: due + days(1),
        ..Policy::default()
    };
    let roles = Roles::parse("http,commands,relay,projector").expect("roles");
    let app = TestApp::spawn_full(backing, policy, Some(bus.clone()), roles).await;
    let env = [
        ("KEYLEDGER_SMTP_URL", smtp.url()),
        ("KEYLEDGER_REMINDER_TICK_MS", "100".to_owned()),
        ("KEYLEDGER_SMTP_RETRY_MS", "100".to_owned()),
        ("KEYLEDGER_SMTP_RETRY_MAX_MS", "1000".to_owned()),
    ];
    let worker = || kafka::spawn_process_env(&database, &bus, "saga,notifier", &env);
    let mut saga = worker().await;
    let (status, body) = app
        .call(
            Method::POST,
            "/v1/accounts/acc-crash/legacy-key",
            Some(json!({"login_email": "owner@agency.gov.sg", "legacy_hash": format!("owner_v1_{:031}", 7)})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut db = PgConnection::connect(&database).await.expect("connect");
    until_count(&mut db, "SELECT count(*) FROM reminder_schedule", 1).await;

    // Killed before the due time, back only after it: the stage is sent late, once.
    kafka::kill9(&mut saga).await;
    let wait = (due - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
    tokio::time::sleep(wait).await;
    let mut saga = worker().await;
    let mails = smtp.wait_for(WAIT_AFTER_RESTART, |m| !m.is_empty()).await;
    assert_eq!(summary(&mails), vec![pair("owner@agency.gov.sg", ONE_DAY)]);
    until_count(
        &mut db,
        "SELECT count(*) FROM notifications WHERE delivered_ms IS NOT NULL",
        1,
    )
    .await;
    kafka::kill9(&mut saga).await;

    // The same events consumed twice: forget every offset and checkpoint of both.
    sqlx::query(
        "DELETE FROM consumer_offsets WHERE consumer IN ('keyledger-saga', 'keyledger-notifier')",
    )
    .execute(&mut db)
    .await
    .expect("forget offsets");
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection IN ('keyledger-saga', 'keyledger-notifier')")
        .execute(&mut db)
        .await
        .expect("forget checkpoints");
    let mut saga = worker().await;
    until_count(
        &mut db,
        "SELECT count(*) FROM projection_checkpoints WHERE projection IN ('keyledger-saga', 'keyledger-notifier')",
        2,
    )
    .await;
    tokio::time::sleep(QUIET).await;
    kafka::kill9(&mut saga).await;
    assert_eq!(smtp.mails().len(), 1, "{:?}", summary(&smtp.mails()));
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM events WHERE event_type = 'ExpiryReminderDue'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&mut db, "SELECT count(*) FROM notifications").await,
        1
    );
}
