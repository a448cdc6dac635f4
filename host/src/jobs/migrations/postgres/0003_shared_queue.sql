-- The shared work queue (issue #12): which instance holds a job (a lease it renews
-- while the job runs), how often it was claimed (a job whose holder died is re-queued
-- once, then failed `worker_lost`), a cancel request for the holder to act on, and the
-- job's model key (claims prefer jobs of the model set an instance has loaded).
-- The embedded SQLite store has the same columns (one schema); only the PostgreSQL
-- queue sets them.
ALTER TABLE jobs ADD COLUMN model_key TEXT;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until BIGINT;
ALTER TABLE jobs ADD COLUMN claims BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_requested BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_waiting ON jobs (status, lease_owner, created_at);
CREATE INDEX jobs_leases ON jobs (lease_owner, lease_until);
