-- The webhook outbox (issue #14): one row per message (one job event for one
-- destination), written in the transaction that changes the job's state.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    -- the `webhook-id` header, the same on every attempt
    message_id          TEXT    NOT NULL UNIQUE,
    job_id              TEXT    NOT NULL,
    event_type          TEXT    NOT NULL,
    url                 TEXT    NOT NULL,
    -- the exact body sent and signed on every attempt
    payload             TEXT    NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    created_at_ms       INTEGER NOT NULL,
    next_attempt_at_ms  INTEGER NOT NULL,
    leased_until_ms     INTEGER,
    last_attempt_at_ms  INTEGER,
    last_status         INTEGER,
    last_error          TEXT,
    delivered_at_ms     INTEGER
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at_ms);
CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id);
