-- Whether requests made with a subcloud's keys are logged (for members whose
-- accounts opted in too), and how many days those logs are kept.
ALTER TABLE subclouds
    ADD COLUMN inference_logging boolean NOT NULL DEFAULT false,
    ADD COLUMN inference_log_retention_days integer NOT NULL DEFAULT 30
        CHECK (inference_log_retention_days BETWEEN 1 AND 365);

-- Full logs of the requests of accounts (and subclouds) that opted in, written off
-- the request's path (server/cloud/inference_logs.py) and deleted once expired.
CREATE TABLE inference_logs (
    -- The request's first job.
    log_id text PRIMARY KEY,
    request_id text NOT NULL,
    account_id uuid NOT NULL,
    -- Empty for the public cloud.
    subcloud_id text NOT NULL,
    -- The request's jobs, in choice order.
    job_ids text[] NOT NULL,
    model text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    request jsonb NOT NULL,
    response jsonb NOT NULL
);
CREATE INDEX inference_logs_jobs ON inference_logs USING gin (job_ids);
CREATE INDEX inference_logs_expiry ON inference_logs (expires_at);
