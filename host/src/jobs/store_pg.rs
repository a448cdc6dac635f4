//! The job store in PostgreSQL, for many flowhost instances behind one URL (issue #12):
//! the same tables, migrations (by version) and behaviour as [`super::store::SqliteStore`],
//! through the same statements ([`super::store::sql_job_store!`]).
//!
//! Owns: connecting (`postgres://…`, TLS through rustls on ring by `sslmode=`/`sslrootcert=`), bringing the schema up to date (sqlx's migration
//! lock makes concurrent starts safe), and the pool the shared work queue and the webhook
//! outbox use. Must never: log the URL (it carries the password), or hold bytes.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool};

use super::store::{StoreError, StoreResult, migrator, sql_job_store};

/// The PostgreSQL migrations (`migrations/postgres/`), version for version the twins of
/// the SQLite ones.
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "jobs assets idempotency", include_str!("migrations/postgres/0001_jobs.sql")),
    (2, "webhook outbox", include_str!("migrations/postgres/0002_webhook_outbox.sql")),
    (3, "shared queue", include_str!("migrations/postgres/0003_shared_queue.sql")),
    (5, "tenants", include_str!("migrations/postgres/0005_tenants.sql")),
    (6, "job labels", include_str!("migrations/postgres/0006_job_labels.sql")),
];

/// The job store in a PostgreSQL database shared by every instance.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// This instance's name on the leases it holds (fresh per process: a restarted
    /// instance holds nothing its predecessor held).
    owner: String,
}

/// How long the first connection may take before the URL is reported unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl PostgresStore {
    /// Connect to `url` (`postgres://user:pass@host:port/db`, TLS by `sslmode=` and
    /// `sslrootcert=`) with up to 16 connections, and migrate.
    pub async fn open(url: &str) -> StoreResult<PostgresStore> {
        Self::open_with(url, 16).await
    }

    /// [`PostgresStore::open`] with at most `max_connections` connections. One connection
    /// is made first, on its own: a refused, unreachable or TLS-failing server is
    /// reported at once with the host and the cause (through the pool it would be
    /// retried until the acquire timeout and reported as "timed out"). The error names
    /// host and port, never the user's password.
    pub async fn open_with(url: &str, max_connections: u32) -> StoreResult<PostgresStore> {
        let options = parse_url(url)?;
        let target = format!("{}:{}", options.get_host(), options.get_port());
        let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| StoreError::Database(format!("connecting to PostgreSQL at {target}: no answer within {} s", CONNECT_TIMEOUT.as_secs())))?
            .map_err(|e| StoreError::Database(format!("connecting to PostgreSQL at {target}: {}", cause(&e))))?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Database(format!("connecting to PostgreSQL at {target}: {}", cause(&e))))?;
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

/// The URL's options; an error that quotes no part of it (it carries the password).
fn parse_url(url: &str) -> StoreResult<PgConnectOptions> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("postgres" | "postgresql")) {
        return Err(StoreError::Database("the database URL must start with postgres:// or postgresql://".into()));
    }
    url.parse().map_err(|e: sqlx::Error| {
        let why = match &e {
            // sqlx names the parameter or value that is wrong (sslmode=…); not the URL.
            sqlx::Error::Configuration(inner) if !inner.to_string().contains('@') => inner.to_string(),
            _ => "it cannot be read as a postgres:// URL".to_string(),
        };
        StoreError::Database(format!("the database URL is not usable: {why}"))
    })
}

/// What went wrong connecting, in the operator's words, with the underlying error
/// (connection refused, certificate unknown, password authentication failed, …).
fn cause(e: &sqlx::Error) -> String {
    match e {
        // rustls reports a refused certificate or handshake through the stream, as invalid data.
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => format!("TLS failed ({io})"),
        sqlx::Error::Io(io) => format!("the server cannot be reached ({io})"),
        sqlx::Error::Tls(tls) => format!("TLS failed ({tls})"),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".into(),
        sqlx::Error::Database(db) => format!("the server refused the connection ({})", db.message()),
        sqlx::Error::Configuration(c) => format!("the connection settings are not usable ({c})"),
        sqlx::Error::Protocol(p) => format!("the server did not answer as PostgreSQL does ({p})"),
        other => format!("the connection failed ({other})"),
    }
}

sql_job_store!(
    PostgresStore,
    sqlx::Postgres,
    "postgres",
    crate::jobs::outbox::insert_deliveries_pg
);
