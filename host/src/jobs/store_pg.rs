//! The job store in PostgreSQL, for many flowhost instances behind one URL (issue #12):
//! the same tables, migrations (by version) and behaviour as [`super::store::SqliteStore`],
//! through the same statements ([`super::store::sql_job_store!`]).
//!
//! Owns: connecting (`postgres://…`), bringing the schema up to date (sqlx's migration
//! lock makes concurrent starts safe), and the pool the shared work queue and the webhook
//! outbox use. Must never: log the URL (it carries the password), or hold bytes.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::store::{StoreError, StoreResult, migrator, sql_job_store};

/// The PostgreSQL migrations (`migrations/postgres/`), version for version the twins of
/// the SQLite ones.
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "jobs assets idempotency", include_str!("migrations/postgres/0001_jobs.sql")),
    (2, "webhook outbox", include_str!("migrations/postgres/0002_webhook_outbox.sql")),
    (3, "shared queue", include_str!("migrations/postgres/0003_shared_queue.sql")),
    (5, "tenants", include_str!("migrations/postgres/0005_tenants.sql")),
];

/// The job store in a PostgreSQL database shared by every instance.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// This instance's name on the leases it holds (fresh per process: a restarted
    /// instance holds nothing its predecessor held).
    owner: String,
}

impl PostgresStore {
    /// Connect to `url` (`postgres://user:pass@host:port/db`) and migrate.
    /// The error names no host, user or password: only what went wrong.
    pub async fn open(url: &str) -> StoreResult<PostgresStore> {
        let options: PgConnectOptions = url.parse().map_err(|_| StoreError("the database URL is not a valid postgres:// URL".into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError(format!("connecting to PostgreSQL: {}", redact(&e))))?;
        migrator(MIGRATIONS).run(&pool).await?;
        Ok(PostgresStore { pool, owner: format!("fh-{}", uuid::Uuid::new_v4().simple()) })
    }

    /// The pool (the webhook outbox and the shared queue use the same database).
    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// The name this instance's leases carry.
    pub fn instance_id(&self) -> &str {
        &self.owner
    }
}

/// A connection error without the parts of the URL it may quote.
fn redact(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Io(_) => "the server cannot be reached",
        sqlx::Error::Tls(_) => "TLS failed",
        sqlx::Error::PoolTimedOut => "timed out",
        sqlx::Error::Database(_) => "the server refused the connection (credentials or database name)",
        sqlx::Error::Configuration(_) => "the database URL is not usable",
        _ => "the connection failed",
    }
}

sql_job_store!(PostgresStore, sqlx::Postgres, "postgres", crate::webhooks::outbox::insert_deliveries_pg);
