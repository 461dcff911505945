//! The notifier's outbox, `notifications`: one row per (event, recipient), published to the
//! notifications topic once (`published_ms`) and delivered by SMTP once (`delivered_ms`);
//! `next_attempt_ms` is NULL when no delivery by SMTP is wanted. The SQL is the same on
//! PostgreSQL and SQLite; times are Unix milliseconds of the machine's clock.

use keyledger_events::{Notification, NotificationStage, StageWord};
use uuid::Uuid;

use crate::store::{with_pool, with_tx, Store, StoreError, Tx};

/// A notification as the outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub notification: Notification,
    pub attempts: i64,
}

/// Which moment of a notification's life to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    Published,
    Delivered,
}

/// Unix milliseconds now, by the machine's clock (delivery bookkeeping, not domain time).
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    i64,
);

const COLUMNS: &str =
    "notification_id, event_id, account_id, key_id, recipient, subject, body, kind, stage, attempts";

fn pending(row: Row) -> Result<Pending, StoreError> {
    let (id, event_id, account_id, key_id, to, subject, body, kind, stage, attempts) = row;
    let uuid = |s: &str| {
        Uuid::parse_str(s).map_err(|e| StoreError::Corrupt {
            account_id: account_id.clone(),
            sequence: 0,
            reason: format!("notification {id}: {e}"),
        })
    };
    Ok(Pending {
        notification: Notification {
            notification_id: uuid(&id)?,
            event_id: uuid(&event_id)?,
            key_id: uuid(&key_id)?,
            account_id: account_id.clone(),
            to,
            subject,
            body,
            stage: if kind == "key_leaked" {
                Some(NotificationStage::Word(StageWord::Leaked))
            } else {
                stage.map(|s| NotificationStage::Days(s.max(0) as u32))
            },
            kind,
        },
        attempts,
    })
}

/// Records a notification (once: its id is derived from the event and the recipient).
/// `published` when there is no topic to publish it on, `deliver` when SMTP is to send it.
pub async fn insert(
    tx: &mut Tx,
    n: &Notification,
    now_ms: i64,
    published: bool,
    deliver: bool,
) -> Result<(), StoreError> {
    with_tx!(tx, |c| {
        sqlx::query(
            "INSERT INTO notifications (notification_id, event_id, account_id, key_id, \
             recipient, subject, body, kind, stage, created_ms, published_ms, next_attempt_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (notification_id) DO NOTHING",
        )
        .bind(n.notification_id.to_string())
        .bind(n.event_id.to_string())
        .bind(&n.account_id)
        .bind(n.key_id.to_string())
        .bind(&n.to)
        .bind(&n.subject)
        .bind(&n.body)
        .bind(&n.kind)
        // The column holds a reminder's days; a word stage follows from the kind.
        .bind(n.stage.and_then(NotificationStage::days).map(i64::from))
        .bind(now_ms)
        .bind(if published { Some(now_ms) } else { None })
        .bind(if deliver { Some(now_ms) } else { None })
        .execute(c)
        .await?;
    });
    Ok(())
}

/// Notifications not yet on the topic, oldest first.
pub async fn unpublished(store: &Store, limit: i64) -> Result<Vec<Pending>, StoreError> {
    let rows: Vec<Row> = with_pool!(store, |pool| {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE published_ms IS NULL \
             ORDER BY created_ms LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(pool)
        .await?
    });
    rows.into_iter().map(pending).collect()
}

/// Notifications whose (next) delivery attempt is due.
pub async fn deliverable(store: &Store, limit: i64) -> Result<Vec<Pending>, StoreError> {
    let now_ms = wall_ms();
    let rows: Vec<Row> = with_pool!(store, |pool| {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE delivered_ms IS NULL \
             AND next_attempt_ms IS NOT NULL AND next_attempt_ms <= $1 \
             ORDER BY next_attempt_ms LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(pool)
        .await?
    });
    rows.into_iter().map(pending).collect()
}

/// Records that a notification was published or delivered.
pub async fn mark(store: &Store, id: Uuid, what: Marked) -> Result<(), StoreError> {
    let sql = match what {
        Marked::Published => "UPDATE notifications SET published_ms = $2 WHERE notification_id = $1",
        Marked::Delivered => {
            "UPDATE notifications SET delivered_ms = $2, last_error = NULL WHERE notification_id = $1"
        }
    };
    with_pool!(store, |pool| {
        sqlx::query(sql)
            .bind(id.to_string())
            .bind(wall_ms())
            .execute(pool)
            .await?;
    });
    Ok(())
}

/// Records a failed delivery attempt and when to try again.
pub async fn failed(
    store: &Store,
    id: Uuid,
    next_attempt_ms: i64,
    error: &str,
) -> Result<(), StoreError> {
    with_pool!(store, |pool| {
        sqlx::query(
            "UPDATE notifications SET attempts = attempts + 1, next_attempt_ms = $2, \
             last_error = $3 WHERE notification_id = $1",
        )
        .bind(id.to_string())
        .bind(next_attempt_ms)
        .bind(error)
        .execute(pool)
        .await?;
    });
    Ok(())
}
