//! Consumer offsets in PostgreSQL: the next offset to read, per consumer and partition,
//! written in the same transaction as the effect of the records before it wherever the
//! caller has one.

use sqlx::PgExecutor;

/// The next offset `consumer` should read on `topic`/`partition` (0 when none is stored).
pub async fn load<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    topic: &str,
    partition: i32,
) -> Result<i64, sqlx::Error> {
    let next: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets WHERE consumer = $1 AND topic = $2 AND partition = $3",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .fetch_optional(db)
    .await?;
    Ok(next.unwrap_or(0))
}

/// Records that everything before `next` on `topic`/`partition` is done (never moves back).
pub async fn save<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    topic: &str,
    partition: i32,
    next: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (consumer, topic, partition) DO UPDATE \
         SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset)",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(next)
    .execute(db)
    .await?;
    Ok(())
}

/// Every stored next offset of `consumer` on `topic`, as (partition, next offset).
pub async fn load_all<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    topic: &str,
) -> Result<Vec<(i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer = $1 AND topic = $2",
    )
    .bind(consumer)
    .bind(topic)
    .fetch_all(db)
    .await
}
