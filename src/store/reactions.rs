//! The tables of the log's two reactions — the reminder saga's schedule and the notifier's
//! outbox — and the per-account checkpoints that make applying an event to them idempotent.
//!
//! The SQL is the same on PostgreSQL and SQLite (times are Unix milliseconds), so it is
//! written once, in a macro that makes a module per database.

use keyledger_events::Notification;
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use super::{Store, StoreError, StoredRecord};
use keyledger_events::EventEnvelope;
use crate::notify::render::Templates;
use crate::reminders::schedule::{change, scheduled_key, Change, KeySchedule, Stages};

/// A notification as the outbox holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub notification: Notification,
    pub attempts: i64,
}

type NotificationRow = (
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

fn notification_of(row: NotificationRow) -> Result<Pending, StoreError> {
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
            kind,
            stage: stage.map(|s| s.max(0) as u32),
        },
        attempts,
    })
}

fn schedule_of(json: &str) -> Result<KeySchedule, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        account_id: String::new(),
        sequence: 0,
        reason: format!("reminder schedule: {e}"),
    })
}

const NOTIFICATION_COLUMNS: &str =
    "notification_id, event_id, account_id, key_id, recipient, subject, body, kind, stage, attempts";

macro_rules! reaction_sql {
    ($name:ident, $conn:ty) => {
        pub(crate) mod $name {
            use super::*;

            pub async fn checkpoint(
                c: &mut $conn,
                consumer: &str,
                account: &str,
            ) -> Result<u64, StoreError> {
                let applied: Option<i64> = sqlx::query_scalar(
                    "SELECT sequence FROM projection_checkpoints WHERE projection = $1 AND account_id = $2",
                )
                .bind(consumer)
                .bind(account)
                .fetch_optional(&mut *c)
                .await?;
                Ok(applied.unwrap_or(0).max(0) as u64)
            }

            pub async fn set_checkpoint(
                c: &mut $conn,
                consumer: &str,
                account: &str,
                applied: u64,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO projection_checkpoints (projection, account_id, sequence) VALUES ($1, $2, $3) \
                     ON CONFLICT (projection, account_id) DO UPDATE SET sequence = excluded.sequence",
                )
                .bind(consumer)
                .bind(account)
                .bind(applied as i64)
                .execute(&mut *c)
                .await?;
                Ok(())
            }

            pub async fn save_offsets(
                c: &mut $conn,
                consumer: &str,
                topic: &str,
                offsets: &[(i32, i64)],
            ) -> Result<(), StoreError> {
                for (partition, next) in offsets {
                    sqlx::query(
                        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition) DO UPDATE \
                         SET next_offset = GREATEST(consumer_offsets.next_offset, excluded.next_offset)",
                    )
                    .bind(consumer)
                    .bind(topic)
                    .bind(*partition)
                    .bind(*next)
                    .execute(&mut *c)
                    .await?;
                }
                Ok(())
            }

            pub async fn schedule(
                c: &mut $conn,
                key_id: Uuid,
            ) -> Result<Option<KeySchedule>, StoreError> {
                let json: Option<String> =
                    sqlx::query_scalar("SELECT schedule FROM reminder_schedule WHERE key_id = $1")
                        .bind(key_id.to_string())
                        .fetch_optional(&mut *c)
                        .await?;
                json.as_deref().map(schedule_of).transpose()
            }

            pub async fn put_schedule(c: &mut $conn, s: &KeySchedule) -> Result<(), StoreError> {
                let json = serde_json::to_string(s).map_err(|e| StoreError::Corrupt {
                    account_id: s.account_id.clone(),
                    sequence: 0,
                    reason: e.to_string(),
                })?;
                sqlx::query(
                    "INSERT INTO reminder_schedule (key_id, account_id, next_due_ms, schedule) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO UPDATE \
                     SET next_due_ms = excluded.next_due_ms, schedule = excluded.schedule",
                )
                .bind(s.key_id.to_string())
                .bind(&s.account_id)
                .bind(s.next_due().timestamp_millis())
                .bind(json)
                .execute(&mut *c)
                .await?;
                Ok(())
            }

            pub async fn remove_schedule(c: &mut $conn, key_id: Uuid) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM reminder_schedule WHERE key_id = $1")
                    .bind(key_id.to_string())
                    .execute(&mut *c)
                    .await?;
                Ok(())
            }

            /// Schedules whose next stage falls due at or before `until_ms`, soonest first,
            /// optionally of one account.
            pub async fn schedules_due(
                c: &mut $conn,
                until_ms: i64,
                account: Option<&str>,
                limit: i64,
            ) -> Result<Vec<KeySchedule>, StoreError> {
                let rows: Vec<String> = sqlx::query_scalar(
                    "SELECT schedule FROM reminder_schedule WHERE next_due_ms <= $1 \
                     AND ($2 IS NULL OR account_id = $2) ORDER BY next_due_ms LIMIT $3",
                )
                .bind(until_ms)
                .bind(account)
                .bind(limit)
                .fetch_all(&mut *c)
                .await?;
                rows.iter().map(|r| schedule_of(r)).collect()
            }

            pub async fn count_due(c: &mut $conn, until_ms: i64) -> Result<i64, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT count(*) FROM reminder_schedule WHERE next_due_ms <= $1",
                )
                .bind(until_ms)
                .fetch_one(&mut *c)
                .await?)
            }

            pub async fn insert_notification(
                c: &mut $conn,
                n: &Notification,
                now_ms: i64,
                published: bool,
                deliver: bool,
            ) -> Result<(), StoreError> {
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
                .bind(n.stage.map(i64::from))
                .bind(now_ms)
                .bind(if published { Some(now_ms) } else { None })
                .bind(if deliver { Some(now_ms) } else { None })
                .execute(&mut *c)
                .await?;
                Ok(())
            }

            pub async fn unpublished(c: &mut $conn, limit: i64) -> Result<Vec<Pending>, StoreError> {
                let rows: Vec<NotificationRow> = sqlx::query_as(&format!(
                    "SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE published_ms IS NULL \
                     ORDER BY created_ms LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&mut *c)
                .await?;
                rows.into_iter().map(notification_of).collect()
            }

            pub async fn deliverable(
                c: &mut $conn,
                now_ms: i64,
                limit: i64,
            ) -> Result<Vec<Pending>, StoreError> {
                let rows: Vec<NotificationRow> = sqlx::query_as(&format!(
                    "SELECT {NOTIFICATION_COLUMNS} FROM notifications WHERE delivered_ms IS NULL \
                     AND next_attempt_ms IS NOT NULL AND next_attempt_ms <= $1 \
                     ORDER BY next_attempt_ms LIMIT $2"
                ))
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *c)
                .await?;
                rows.into_iter().map(notification_of).collect()
            }

            pub async fn mark(
                c: &mut $conn,
                id: Uuid,
                column: Marked,
                now_ms: i64,
            ) -> Result<(), StoreError> {
                let sql = match column {
                    Marked::Published => {
                        "UPDATE notifications SET published_ms = $2 WHERE notification_id = $1"
                    }
                    Marked::Delivered => {
                        "UPDATE notifications SET delivered_ms = $2, last_error = NULL \
                         WHERE notification_id = $1"
                    }
                };
                sqlx::query(sql)
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            }

            pub async fn failed(
                c: &mut $conn,
                id: Uuid,
                next_attempt_ms: i64,
                error: &str,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE notifications SET attempts = attempts + 1, next_attempt_ms = $2, \
                     last_error = $3 WHERE notification_id = $1",
                )
                .bind(id.to_string())
                .bind(next_attempt_ms)
                .bind(error)
                .execute(&mut *c)
                .await?;
                Ok(())
            }

            pub async fn delivery_counts(c: &mut $conn) -> Result<(i64, i64), StoreError> {
                let (delivered, waiting): (i64, i64) = sqlx::query_as(
                    "SELECT COUNT(delivered_ms), \
                     COUNT(CASE WHEN delivered_ms IS NULL AND next_attempt_ms IS NOT NULL THEN 1 END) \
                     FROM notifications",
                )
                .fetch_one(&mut *c)
                .await?;
                Ok((delivered, waiting))
            }
        }
    };
}

reaction_sql!(pg, sqlx::PgConnection);
reaction_sql!(lite, sqlx::SqliteConnection);

/// Which moment of a notification's life to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    Published,
    Delivered,
}

/// Runs `$body` in a transaction on whichever database `$db` is, with `$c` the connection
/// and `$sql` the module of queries for that database.
macro_rules! in_tx {
    ($db:expr, |$c:ident, $sql:ident| $body:expr) => {
        match $db {
            Reactions::Pg(pool) => {
                let mut tx = pool.begin().await?;
                let out = {
                    let $c: &mut sqlx::PgConnection = &mut tx;
                    use pg as $sql;
                    $body
                };
                tx.commit().await?;
                Ok(out)
            }
            Reactions::Lite(pool) => {
                let mut tx = pool.begin().await?;
                let out = {
                    let $c: &mut sqlx::SqliteConnection = &mut tx;
                    use lite as $sql;
                    $body
                };
                tx.commit().await?;
                Ok(out)
            }
        }
    };
}

/// What a batch of one account's events is turned into by a reaction.
pub enum Effect<'a> {
    /// The saga: update the schedule of each key the events name.
    Schedule(&'a Stages),
    /// The notifier: record the notifications each event causes, rendered from these
    /// templates (`last_stage` says its reminder is the last); `published` when there is no
    /// topic to publish them on, `deliver` when SMTP is to send them.
    Notify {
        templates: &'a Templates,
        last_stage: Option<u32>,
        published: bool,
        deliver: bool,
    },
}

/// The saga's and the notifier's tables, on the service's database.
#[derive(Clone)]
pub enum Reactions {
    Pg(PgPool),
    Lite(SqlitePool),
}

/// Unix milliseconds now, by the machine's clock (delivery bookkeeping, not domain time).
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Reactions {
    pub fn of(store: &Store) -> Self {
        match &store.backend {
            super::Backend::Postgres { pool, .. } => Reactions::Pg(pool.clone()),
            super::Backend::Sqlite { pool, .. } => Reactions::Lite(pool.clone()),
        }
    }

    /// The last sequence of `account` that `consumer` applied.
    pub async fn checkpoint(&self, consumer: &str, account: &str) -> Result<u64, StoreError> {
        in_tx!(self, |c, sql| sql::checkpoint(c, consumer, account).await?)
    }

    /// Applies each account's records (in order; those at or below the account's
    /// checkpoint skipped), moves the checkpoints and, for a consumer of the events topic,
    /// stores its next offsets — all in one transaction. A gap before an account's first
    /// new record is filled from the event store and the batch applied again.
    pub async fn apply(
        &self,
        store: &Store,
        consumer: &str,
        by_account: &[(String, Vec<StoredRecord>)],
        effect: &Effect<'_>,
        offsets: Option<(&str, &[(i32, i64)])>,
    ) -> Result<(), StoreError> {
        let mut batch = std::borrow::Cow::Borrowed(by_account);
        for _ in 0..=by_account.len() {
            let Some((i, checkpoint)) = self.apply_once(consumer, &batch, effect, offsets).await?
            else {
                return Ok(());
            };
            // Read outside the transaction: SQLite has a single connection.
            let (account, records) = &batch[i];
            let first = records
                .iter()
                .map(|r| r.sequence)
                .find(|s| *s > checkpoint)
                .unwrap_or(u64::MAX);
            let mut filled = store.events_after(account, checkpoint).await?;
            filled.retain(|r| r.sequence < first);
            filled.extend(records.iter().filter(|r| r.sequence >= first).cloned());
            batch.to_mut()[i].1 = filled;
        }
        Err(StoreError::Gap { checkpoint: 0 })
    }

    /// One attempt of [`Reactions::apply`]: `Some((account index, checkpoint))` when an
    /// account's records start past its checkpoint + 1 (nothing is written then).
    async fn apply_once(
        &self,
        consumer: &str,
        by_account: &[(String, Vec<StoredRecord>)],
        effect: &Effect<'_>,
        offsets: Option<(&str, &[(i32, i64)])>,
    ) -> Result<Option<(usize, u64)>, StoreError> {
        let now_ms = wall_ms();
        in_tx!(self, |c, sql| {
            for (i, (account, records)) in by_account.iter().enumerate() {
                let checkpoint = sql::checkpoint(c, consumer, account).await?;
                let mut applied = checkpoint;
                for record in records.iter().filter(|r| r.sequence > checkpoint) {
                    if record.sequence != applied + 1 {
                        if applied == checkpoint {
                            return Ok(Some((i, checkpoint)));
                        }
                        // A hole inside the batch itself: the records handed in are wrong.
                        return Err(StoreError::Gap {
                            checkpoint: applied,
                        });
                    }
                    match effect {
                        Effect::Schedule(stages) => {
                            let key_id = scheduled_key(&record.event);
                            let current = sql::schedule(c, key_id).await?;
                            match change(account, current.as_ref(), &record.event, stages) {
                                Change::Put(s) => sql::put_schedule(c, &s).await?,
                                Change::Remove(k) => sql::remove_schedule(c, k).await?,
                                Change::None => {}
                            }
                        }
                        Effect::Notify {
                            templates,
                            last_stage,
                            published,
                            deliver,
                        } => {
                            let event_id = EventEnvelope::event_id_for(&record.account_id, record.sequence);
                            for n in templates.render(account, event_id, &record.event, *last_stage)
                            {
                                sql::insert_notification(c, &n, now_ms, *published, *deliver)
                                    .await?;
                            }
                        }
                    }
                    applied = record.sequence;
                }
                if applied != checkpoint {
                    sql::set_checkpoint(c, consumer, account, applied).await?;
                }
            }
            if let Some((topic, offsets)) = offsets {
                sql::save_offsets(c, consumer, topic, offsets).await?;
            }
            None
        })
    }

    /// Schedules with something due at or before `until`, soonest first.
    pub async fn schedules_due(
        &self,
        until: chrono::DateTime<chrono::Utc>,
        account: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeySchedule>, StoreError> {
        let until = until.timestamp_millis();
        in_tx!(self, |c, sql| sql::schedules_due(c, until, account, limit)
            .await?)
    }

    /// How many keys have something due at or before `until`.
    pub async fn count_due(&self, until: chrono::DateTime<chrono::Utc>) -> Result<i64, StoreError> {
        let until = until.timestamp_millis();
        in_tx!(self, |c, sql| sql::count_due(c, until).await?)
    }

    pub async fn unpublished(&self, limit: i64) -> Result<Vec<Pending>, StoreError> {
        in_tx!(self, |c, sql| sql::unpublished(c, limit).await?)
    }

    pub async fn deliverable(&self, limit: i64) -> Result<Vec<Pending>, StoreError> {
        let now = wall_ms();
        in_tx!(self, |c, sql| sql::deliverable(c, now, limit).await?)
    }

    pub async fn mark(&self, id: Uuid, what: Marked) -> Result<(), StoreError> {
        let now = wall_ms();
        in_tx!(self, |c, sql| sql::mark(c, id, what, now).await?)
    }

    pub async fn failed(&self, id: Uuid, retry_at_ms: i64, error: &str) -> Result<(), StoreError> {
        in_tx!(self, |c, sql| sql::failed(c, id, retry_at_ms, error)
            .await?)
    }

    /// (delivered, waiting for delivery) notifications.
    pub async fn delivery_counts(&self) -> Result<(i64, i64), StoreError> {
        in_tx!(self, |c, sql| sql::delivery_counts(c).await?)
    }
}
