-- The prices each job's request was admitted at (its cost is its usage at them;
-- jobs recorded before this column existed cost 0), and the indexes the jobs API
-- lists by: one account's jobs newest first, and the jobs still running.
ALTER TABLE network_jobs
    ADD COLUMN prompt_price bigint NOT NULL DEFAULT 0 CHECK (prompt_price >= 0),
    ADD COLUMN completion_price bigint NOT NULL DEFAULT 0 CHECK (completion_price >= 0);
CREATE INDEX network_jobs_account ON network_jobs (network_id, account_id, created_at, job_id);
CREATE INDEX network_jobs_running ON network_jobs (network_id, created_at, job_id)
    WHERE outcome = 'running';
