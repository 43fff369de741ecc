-- The consumer usage projection (server/account/usage.py): one record per settled
-- hold, and per account and hour the sums the usage charts read.
CREATE TABLE usage_records (
    hold_id    uuid PRIMARY KEY,
    account_id uuid NOT NULL,
    status     text NOT NULL CHECK (status IN ('settled', 'released')),
    held       bigint NOT NULL CHECK (held >= 0),
    charged    bigint NOT NULL CHECK (charged >= 0),
    tokens     bigint NOT NULL CHECK (tokens >= 0),
    settled_at timestamptz NOT NULL
);
CREATE INDEX usage_records_account ON usage_records (account_id, settled_at DESC, hold_id DESC);

CREATE TABLE usage_hourly (
    account_id uuid NOT NULL,
    hour       timestamptz NOT NULL,
    requests   bigint NOT NULL,
    tokens     bigint NOT NULL,
    charged    bigint NOT NULL,
    PRIMARY KEY (account_id, hour)
);

-- Settlements made before this projection existed, from the events the outbox keeps.
INSERT INTO usage_records (hold_id, account_id, status, held, charged, tokens, settled_at)
SELECT (payload->>'hold_id')::uuid, (payload->>'account_id')::uuid, payload->>'status',
       (payload->>'held')::bigint, (payload->>'captured')::bigint,
       (payload->>'total_tokens')::bigint, (payload->>'settled_at')::timestamptz
FROM ledger_outbox WHERE kind = 'usage.settled'
ON CONFLICT (hold_id) DO NOTHING;

INSERT INTO usage_hourly (account_id, hour, requests, tokens, charged)
SELECT account_id, date_trunc('hour', settled_at, 'UTC'), count(*), sum(tokens), sum(charged)
FROM usage_records GROUP BY 1, 2;
