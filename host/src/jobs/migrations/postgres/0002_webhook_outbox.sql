-- The webhook outbox (issue #14), PostgreSQL twin of sqlite/0002_webhook_outbox.sql:
-- one row per message, written in the transaction that changes the job's state.
-- Integers are BIGINT: the store binds and reads every one as i64 on both dialects.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id                  BIGSERIAL PRIMARY KEY,
    message_id          TEXT    NOT NULL UNIQUE,
    job_id              TEXT    NOT NULL,
    event_type          TEXT    NOT NULL,
    url                 TEXT    NOT NULL,
    payload             TEXT    NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts            BIGINT  NOT NULL DEFAULT 0,
    created_at_ms       BIGINT  NOT NULL,
    next_attempt_at_ms  BIGINT  NOT NULL,
    leased_until_ms     BIGINT,
    last_attempt_at_ms  BIGINT,
    last_status         BIGINT,
    last_error          TEXT,
    delivered_at_ms     BIGINT
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at_ms);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id);
