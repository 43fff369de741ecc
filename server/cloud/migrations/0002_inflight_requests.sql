-- Requests a cloud replica is serving, with what settling their hold takes. The
-- replica renews its rows' lease while it lives and deletes a row once its hold is
-- settled; a row whose lease lapsed is an orphan that any replica settles from the
-- network's job records (server/cloud/orphans.py).
CREATE TABLE cloud_inflight_requests (
    hold_id text PRIMARY KEY,
    hold_amount bigint NOT NULL CHECK (hold_amount >= 0),
    request_id text NOT NULL,
    -- The request's jobs (one per choice or input), in order.
    job_ids text[] NOT NULL,
    model text NOT NULL,
    prompt_price bigint NOT NULL,
    completion_price bigint NOT NULL,
    replica_id text NOT NULL,
    lease_expires timestamptz NOT NULL,
    -- When a sweeper first took the row after its lease lapsed.
    orphaned_at timestamptz
);
CREATE INDEX cloud_inflight_requests_lease ON cloud_inflight_requests (lease_expires);
