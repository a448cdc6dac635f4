-- Jobs: a few columns to select on, the rest as a JSON document (TEXT, as in SQLite:
-- the store reads and writes the whole document; nothing queries inside it).
-- The PostgreSQL twin of sqlite/0001_jobs.sql: same tables, columns and meaning.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX jobs_status_created ON jobs (status, created_at);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_expires ON jobs (expires_at);

-- Assets: UUID records over content-addressed blobs (hash = 'blake3:<hex>').
CREATE TABLE assets (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    name TEXT,
    job_id TEXT,
    node_id TEXT,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);
CREATE INDEX assets_hash ON assets (hash);
CREATE INDEX assets_job ON assets (job_id);

-- Idempotency keys: which request fingerprint claimed a key, for which job, until when.
CREATE TABLE idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
