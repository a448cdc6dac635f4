-- Job labels (issue #23): the caller's `metadata` on a job, one row per key, so the job
-- list can filter by `metadata[key]=value` without reading every job document. The labels
-- are also in the job document (returned on the job); these rows are the index.
CREATE TABLE job_labels (
    job_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
);
CREATE INDEX job_labels_match ON job_labels (key, value, job_id);
