-- The network's durable state. Every row belongs to one network id, so several
-- networks (or test runs) can share a database.

-- What the network remembers of a node between sessions and across replicas.
CREATE TABLE network_node_standings (
    network_id text NOT NULL,
    node_id text NOT NULL,
    operator_account_id text NOT NULL DEFAULT '',
    reputation double precision NOT NULL CHECK (reputation BETWEEN 0 AND 1),
    failed_canary boolean NOT NULL DEFAULT false,
    -- Empty unless the node is quarantined.
    quarantine_reason text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (network_id, node_id)
);

-- Every version of the network configuration; the highest is current.
CREATE TABLE network_configs (
    network_id text NOT NULL,
    version bigint NOT NULL CHECK (version > 0),
    heartbeat_interval_s double precision NOT NULL,
    heartbeat_timeout_s double precision NOT NULL,
    min_agent_version text NOT NULL,
    canary_rate double precision NOT NULL,
    -- [{model, price: {prompt, completion}, context_length, runtimes}]
    models jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (network_id, version)
);

-- Which node applied which version, and when.
CREATE TABLE network_config_acks (
    network_id text NOT NULL,
    version bigint NOT NULL,
    node_id text NOT NULL,
    acked_at timestamptz NOT NULL,
    PRIMARY KEY (network_id, version, node_id),
    FOREIGN KEY (network_id, version) REFERENCES network_configs (network_id, version)
);

-- One row per job, written at assignment, at each migration and at the end.
CREATE TABLE network_jobs (
    network_id text NOT NULL,
    job_id text NOT NULL,
    request_id text NOT NULL,
    account_id text NOT NULL,
    subcloud_id text NOT NULL,
    model text NOT NULL,
    -- [{node_id, epoch, operator_account_id, assigned_at}] in epoch order
    assignments jsonb NOT NULL,
    prompt_tokens integer NOT NULL,
    completion_tokens integer NOT NULL,
    created_at timestamptz NOT NULL,
    first_token_at timestamptz,
    finished_at timestamptz,
    outcome text NOT NULL CHECK (outcome IN ('running', 'finished', 'failed', 'cancelled')),
    detail text NOT NULL,
    PRIMARY KEY (network_id, job_id)
);
CREATE INDEX network_jobs_request ON network_jobs (network_id, request_id);
CREATE INDEX network_jobs_created ON network_jobs (network_id, created_at);
