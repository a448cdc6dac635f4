//! The durable outbox: one row per message (a job event for one destination) in the job
//! store's database, from the moment the job's state changed until it is delivered or
//! dead-lettered.
//!
//! Owns the `webhook_deliveries` table's queries: enqueue (inside the caller's
//! transaction, so the row commits with the job's state change or not at all), claiming
//! due rows under a lease, recording an attempt's outcome, counts and the dead-letter
//! listing. Must never sign or send anything (that is [`crate::webhooks::delivery`]) and never
//! store a secret (messages are signed at send time with the current keys, so a
//! rotation also covers messages already waiting).
//!
//! A claimed row carries a lease (`leased_until_ms`): a process that dies mid-attempt
//! leaves it pending, and it is due again once the lease runs out (at least once). With
//! the embedded SQLite store one process owns the database, so a starting dispatcher
//! releases every lease at once ([`OutboxStore::release_leases`]). With PostgreSQL
//! ([`PgOutbox`]) many instances share the table: claims skip rows another instance
//! has locked (`FOR UPDATE SKIP LOCKED`), and a starting instance releases nothing (a
//! lease held by a live peer is that peer's; a dead peer's runs out).
//!
//! The statements are written once ([`sql_outbox!`]) in SQL both dialects read.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, SqliteConnection, SqlitePool};

/// The outbox table: migration 2 of the job store (`jobs/migrations/`).
pub const MIGRATION_SQL: &str = include_str!("migrations/sqlite/0002_webhook_outbox.sql");

/// A message to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// The `webhook-id`, the same on every attempt.
    pub message_id: String,
    pub job_id: String,
    /// `job.succeeded`, ...
    pub event_type: String,
    pub url: String,
    /// The exact body sent (and signed) on every attempt.
    pub payload: String,
    pub created_at_ms: i64,
}

/// A claimed message, due for an attempt now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub row_id: i64,
    pub message_id: String,
    pub job_id: String,
    pub event_type: String,
    pub url: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptRecord {
    Delivered { status: u16 },
    /// Try again at `next_attempt_at_ms`.
    Retry { status: Option<u16>, error: String, next_attempt_at_ms: i64 },
    /// Out of attempts, or a destination that must not be contacted: give up.
    Dead { status: Option<u16>, error: String },
}

/// A message that was given up on, for the admin listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub message_id: String,
    pub job_id: String,
    pub event_type: String,
    /// Scheme, host, port and path only: a query string may hold the receiver's token.
    pub destination: String,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub last_attempt_at_ms: Option<i64>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
}

/// How many messages are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
}

/// Errors of the outbox store (the database's).
#[derive(Debug, thiserror::Error)]
#[error("webhook outbox: {0}")]
pub struct OutboxError(#[from] sqlx::Error);

/// The outbox behind one interface (SQLite now; PostgreSQL with the scale-out work).
#[async_trait::async_trait]
pub trait OutboxStore: Send + Sync {
    /// Enqueue messages on their own (tests, tools); job events are enqueued by the job
    /// store inside the transaction that changes the job's state ([`insert_deliveries`]).
    async fn enqueue(&self, deliveries: &[NewDelivery]) -> Result<(), OutboxError>;
    /// Claim up to `limit` messages due at `now_ms`, leasing them for `lease`.
    async fn claim_due(&self, now_ms: i64, lease: Duration, limit: u32) -> Result<Vec<DueDelivery>, OutboxError>;
    /// When the next pending message becomes due (lease included), if any is pending.
    async fn next_due_at(&self) -> Result<Option<i64>, OutboxError>;
    /// Record one attempt of a claimed message and release its lease.
    async fn record(&self, row_id: i64, at_ms: i64, outcome: &AttemptRecord) -> Result<(), OutboxError>;
    /// Release every lease (a starting single-process dispatcher).
    async fn release_leases(&self) -> Result<u64, OutboxError>;
    async fn counts(&self) -> Result<OutboxCounts, OutboxError>;
    /// Dead letters, newest first.
    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, OutboxError>;
    /// Delete delivered messages older than `delivered_before_ms` and dead letters older
    /// than `dead_before_ms`; returns how many went.
    async fn sweep(&self, delivered_before_ms: i64, dead_before_ms: i64) -> Result<u64, OutboxError>;
}

/// The one INSERT of a message (both dialects).
const INSERT_DELIVERY: &str = "INSERT INTO webhook_deliveries (message_id, job_id, event_type, url, payload, created_at_ms, next_attempt_at_ms) \
                               VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Insert messages on `connection`: call it inside the transaction that records the
/// job's new state, so the job's state and its messages commit together.
pub async fn insert_deliveries(connection: &mut SqliteConnection, deliveries: &[NewDelivery]) -> Result<(), OutboxError> {
    for d in deliveries {
        sqlx::query(INSERT_DELIVERY)
            .bind(&d.message_id)
            .bind(&d.job_id)
            .bind(&d.event_type)
            .bind(&d.url)
            .bind(&d.payload)
            .bind(d.created_at_ms)
            .bind(d.created_at_ms)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// [`insert_deliveries`] on a PostgreSQL connection.
pub async fn insert_deliveries_pg(connection: &mut PgConnection, deliveries: &[NewDelivery]) -> Result<(), OutboxError> {
    for d in deliveries {
        sqlx::query(INSERT_DELIVERY)
            .bind(&d.message_id)
            .bind(&d.job_id)
            .bind(&d.event_type)
            .bind(&d.url)
            .bind(&d.payload)
            .bind(d.created_at_ms)
            .bind(d.created_at_ms)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// The outbox in the shared PostgreSQL job store (the table comes from the store's
/// migrations).
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: PgPool,
}

impl PgOutbox {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// The outbox in the job store's SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
}

impl SqliteOutbox {
    /// Over the job store's pool (the table comes from the store's migrations).
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Open (creating if needed) a database file of its own and create the table there
    /// (idempotent): for tools and tests that run the outbox without a job store.
    pub async fn open_standalone(path: &std::path::Path) -> Result<Self, OutboxError> {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::raw_sql(MIGRATION_SQL).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// Close the pool (a clean stop; tests use it to simulate a restart).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `url` without its query and fragment (the listing's `destination`).
fn destination_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => String::from("(unparsable)"),
    }
}

fn status_of(value: Option<i64>) -> Option<u16> {
    value.and_then(|v| u16::try_from(v).ok())
}

/// The one implementation of [`OutboxStore`] over SQL, per dialect: `$lock` is what the
/// claim's inner SELECT adds (`FOR UPDATE SKIP LOCKED` where many instances claim at
/// once), `$release_on_start` whether [`OutboxStore::release_leases`] may release every
/// lease (only when one process owns the database).
macro_rules! sql_outbox {
    ($outbox:ty, $insert:path, $lock:literal, $release_on_start:literal) => {
        const _: () = {
            use sqlx::Row;

        #[async_trait::async_trait]
        impl OutboxStore for $outbox {
            async fn enqueue(&self, deliveries: &[NewDelivery]) -> Result<(), OutboxError> {
                let mut transaction = self.pool.begin().await?;
                $insert(&mut transaction, deliveries).await?;
                transaction.commit().await?;
                Ok(())
            }

            async fn claim_due(&self, now_ms: i64, lease: Duration, limit: u32) -> Result<Vec<DueDelivery>, OutboxError> {
                let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
                let rows = sqlx::query(concat!(
                    "UPDATE webhook_deliveries SET leased_until_ms = $1 \
                     WHERE id IN (SELECT id FROM webhook_deliveries \
                                  WHERE state = 'pending' AND next_attempt_at_ms <= $2 \
                                    AND (leased_until_ms IS NULL OR leased_until_ms <= $2) \
                                  ORDER BY next_attempt_at_ms LIMIT $3",
                    $lock,
                    ") RETURNING id, message_id, job_id, event_type, url, payload, attempts",
                ))
                .bind(now_ms.saturating_add(lease_ms))
                .bind(now_ms)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                let mut due = Vec::with_capacity(rows.len());
                for row in rows {
                    due.push(DueDelivery {
                        row_id: row.try_get("id")?,
                        message_id: row.try_get("message_id")?,
                        job_id: row.try_get("job_id")?,
                        event_type: row.try_get("event_type")?,
                        url: row.try_get("url")?,
                        payload: row.try_get("payload")?,
                        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                    });
                }
                Ok(due)
            }

            async fn next_due_at(&self) -> Result<Option<i64>, OutboxError> {
                let next: Option<i64> = sqlx::query_scalar(
                    "SELECT MIN(CASE WHEN next_attempt_at_ms > COALESCE(leased_until_ms, 0) THEN next_attempt_at_ms ELSE COALESCE(leased_until_ms, 0) END) FROM webhook_deliveries WHERE state = 'pending'",
                )
                .fetch_one(&self.pool)
                .await?;
                Ok(next)
            }

            async fn record(&self, row_id: i64, at_ms: i64, outcome: &AttemptRecord) -> Result<(), OutboxError> {
                let query = match outcome {
                    AttemptRecord::Delivered { status } => sqlx::query(
                        "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1, last_attempt_at_ms = $1, \
                         delivered_at_ms = $1, last_status = $2, last_error = NULL, leased_until_ms = NULL WHERE id = $3",
                    )
                    .bind(at_ms)
                    .bind(i64::from(*status)),
                    AttemptRecord::Retry { status, error, next_attempt_at_ms } => sqlx::query(
                        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at_ms = $1, last_status = $2, \
                         last_error = $3, next_attempt_at_ms = $4, leased_until_ms = NULL WHERE id = $5",
                    )
                    .bind(at_ms)
                    .bind(status.map(i64::from))
                    .bind(error.clone())
                    .bind(*next_attempt_at_ms),
                    AttemptRecord::Dead { status, error } => sqlx::query(
                        "UPDATE webhook_deliveries SET state = 'dead', attempts = attempts + 1, last_attempt_at_ms = $1, \
                         last_status = $2, last_error = $3, leased_until_ms = NULL WHERE id = $4",
                    )
                    .bind(at_ms)
                    .bind(status.map(i64::from))
                    .bind(error.clone()),
                };
                query.bind(row_id).execute(&self.pool).await?;
                Ok(())
            }

            async fn release_leases(&self) -> Result<u64, OutboxError> {
                if !$release_on_start {
                    return Ok(0);
                }
                let done = sqlx::query("UPDATE webhook_deliveries SET leased_until_ms = NULL WHERE state = 'pending' AND leased_until_ms IS NOT NULL")
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn counts(&self) -> Result<OutboxCounts, OutboxError> {
                let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM webhook_deliveries GROUP BY state").fetch_all(&self.pool).await?;
                let mut counts = OutboxCounts::default();
                for row in rows {
                    let state: String = row.try_get("state")?;
                    let n = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
                    match state.as_str() {
                        "pending" => counts.pending = n,
                        "delivered" => counts.delivered = n,
                        "dead" => counts.dead = n,
                        _ => {}
                    }
                }
                Ok(counts)
            }

            async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, OutboxError> {
                let rows = sqlx::query(
                    "SELECT message_id, job_id, event_type, url, attempts, created_at_ms, last_attempt_at_ms, last_status, last_error \
                     FROM webhook_deliveries WHERE state = 'dead' ORDER BY last_attempt_at_ms DESC, id DESC LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                let mut letters = Vec::with_capacity(rows.len());
                for row in rows {
                    let url: String = row.try_get("url")?;
                    letters.push(DeadLetter {
                        message_id: row.try_get("message_id")?,
                        job_id: row.try_get("job_id")?,
                        event_type: row.try_get("event_type")?,
                        destination: destination_of(&url),
                        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                        created_at_ms: row.try_get("created_at_ms")?,
                        last_attempt_at_ms: row.try_get("last_attempt_at_ms")?,
                        last_status: status_of(row.try_get("last_status")?),
                        last_error: row.try_get("last_error")?,
                    });
                }
                Ok(letters)
            }

            async fn sweep(&self, delivered_before_ms: i64, dead_before_ms: i64) -> Result<u64, OutboxError> {
                let done = sqlx::query(
                    "DELETE FROM webhook_deliveries WHERE (state = 'delivered' AND delivered_at_ms < $1) \
                     OR (state = 'dead' AND last_attempt_at_ms < $2)",
                )
                .bind(delivered_before_ms)
                .bind(dead_before_ms)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }
        }
        };
    };
}

sql_outbox!(SqliteOutbox, insert_deliveries, "", true);
sql_outbox!(PgOutbox, insert_deliveries_pg, " FOR UPDATE SKIP LOCKED", false);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh database file with the outbox table (the job store's migrations add it in
    /// the service).
    pub(crate) async fn scratch_outbox() -> (SqliteOutbox, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("outbox.db")).create_if_missing(true);
        let pool = SqlitePool::connect_with(options).await.unwrap();
        sqlx::raw_sql(MIGRATION_SQL).execute(&pool).await.unwrap();
        (SqliteOutbox::new(pool), dir)
    }

    pub(crate) fn message(n: u32, created_at_ms: i64) -> NewDelivery {
        NewDelivery {
            message_id: format!("msg_{n}"),
            job_id: format!("job-{n}"),
            event_type: "job.succeeded".into(),
            url: format!("https://hooks.example.com/h?token=secret-{n}"),
            payload: format!("{{\"n\":{n}}}"),
            created_at_ms,
        }
    }

    #[tokio::test]
    async fn a_claimed_message_is_leased_and_not_claimed_twice() {
        let (outbox, _dir) = scratch_outbox().await;
        outbox.enqueue(&[message(1, 1000), message(2, 1000)]).await.unwrap();
        let first = outbox.claim_due(1000, Duration::from_secs(60), 10).await.unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].attempts, 0);
        assert!(outbox.claim_due(1001, Duration::from_secs(60), 10).await.unwrap().is_empty(), "leased rows are not due");
        assert_eq!(outbox.next_due_at().await.unwrap(), Some(61_000));
        // The lease runs out (a process died mid-attempt): the message is due again.
        assert_eq!(outbox.claim_due(61_000, Duration::from_secs(60), 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_retry_keeps_the_message_id_and_payload_and_counts_the_attempt() {
        let (outbox, _dir) = scratch_outbox().await;
        outbox.enqueue(&[message(1, 1000)]).await.unwrap();
        let due = outbox.claim_due(1000, Duration::from_secs(60), 10).await.unwrap();
        let retry = AttemptRecord::Retry { status: Some(500), error: "status 500".into(), next_attempt_at_ms: 6000 };
        outbox.record(due[0].row_id, 1000, &retry).await.unwrap();
        assert!(outbox.claim_due(5999, Duration::from_secs(60), 10).await.unwrap().is_empty());
        let again = outbox.claim_due(6000, Duration::from_secs(60), 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].message_id.as_str(), again[0].payload.as_str(), again[0].attempts), ("msg_1", "{\"n\":1}", 1));
        outbox.record(again[0].row_id, 6000, &AttemptRecord::Delivered { status: 204 }).await.unwrap();
        assert_eq!(outbox.counts().await.unwrap(), OutboxCounts { pending: 0, delivered: 1, dead: 0 });
        assert_eq!(outbox.next_due_at().await.unwrap(), None);
    }

    #[tokio::test]
    async fn dead_letters_are_listed_without_the_query_string() {
        let (outbox, _dir) = scratch_outbox().await;
        outbox.enqueue(&[message(1, 1000)]).await.unwrap();
        let due = outbox.claim_due(1000, Duration::from_secs(60), 10).await.unwrap();
        outbox.record(due[0].row_id, 2000, &AttemptRecord::Dead { status: Some(503), error: "status 503".into() }).await.unwrap();
        let letters = outbox.dead_letters(10).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].destination, "https://hooks.example.com/h");
        assert_eq!((letters[0].attempts, letters[0].last_status), (1, Some(503)));
        assert_eq!(outbox.counts().await.unwrap().dead, 1);
        assert!(outbox.claim_due(10_000_000, Duration::from_secs(60), 10).await.unwrap().is_empty(), "dead letters are never retried");
    }

    #[tokio::test]
    async fn a_message_enqueued_in_a_rolled_back_transaction_does_not_exist() {
        let (outbox, _dir) = scratch_outbox().await;
        let mut transaction = outbox.pool.begin().await.unwrap();
        insert_deliveries(&mut transaction, &[message(1, 1000)]).await.unwrap();
        transaction.rollback().await.unwrap();
        assert_eq!(outbox.counts().await.unwrap(), OutboxCounts::default());
    }

    #[tokio::test]
    async fn release_leases_makes_claimed_messages_due_at_once() {
        let (outbox, _dir) = scratch_outbox().await;
        outbox.enqueue(&[message(1, 1000)]).await.unwrap();
        outbox.claim_due(1000, Duration::from_secs(60), 10).await.unwrap();
        assert_eq!(outbox.release_leases().await.unwrap(), 1);
        assert_eq!(outbox.claim_due(1001, Duration::from_secs(60), 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn sweep_removes_old_delivered_and_dead_messages_only() {
        let (outbox, _dir) = scratch_outbox().await;
        outbox.enqueue(&[message(1, 1000), message(2, 1000), message(3, 1000)]).await.unwrap();
        let due = outbox.claim_due(1000, Duration::from_secs(60), 10).await.unwrap();
        outbox.record(due[0].row_id, 2000, &AttemptRecord::Delivered { status: 200 }).await.unwrap();
        outbox.record(due[1].row_id, 2000, &AttemptRecord::Dead { status: None, error: "refused".into() }).await.unwrap();
        assert_eq!(outbox.sweep(3000, 1500).await.unwrap(), 1, "the delivered one only");
        assert_eq!(outbox.counts().await.unwrap(), OutboxCounts { pending: 1, delivered: 0, dead: 1 });
    }
}
