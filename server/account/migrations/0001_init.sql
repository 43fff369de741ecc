-- Accounts, API keys and a double-entry credit ledger (amounts in micro-credits).

CREATE TABLE accounts (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    disabled   boolean NOT NULL DEFAULT false
);

CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    account_id uuid NOT NULL REFERENCES accounts (id),
    name       text NOT NULL,
    prefix     text NOT NULL,
    -- SHA-256 hex of the whole key; the key itself is never stored.
    key_hash   text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_account_id ON api_keys (account_id);

-- Balances as four running totals per ledger account (as in TigerBeetle).
-- available = credits_posted - debits_posted - debits_pending.
CREATE TABLE ledger_accounts (
    id              uuid PRIMARY KEY,
    owner_id        uuid REFERENCES accounts (id),
    kind            text NOT NULL CHECK (kind IN ('consumer', 'platform_revenue', 'cash_in')),
    debits_pending  bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted   bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted  bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_must_not_exceed_credits boolean NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The last line of defence against overspending; the service checks first.
    CONSTRAINT ledger_accounts_debits_within_credits CHECK (
        NOT debits_must_not_exceed_credits
        OR debits_pending + debits_posted <= credits_posted
    ),
    CONSTRAINT ledger_accounts_system_has_no_owner CHECK (
        (owner_id IS NULL) = (kind IN ('platform_revenue', 'cash_in'))
    )
);
CREATE UNIQUE INDEX ledger_accounts_owner_kind ON ledger_accounts (owner_id, kind)
    WHERE owner_id IS NOT NULL;
CREATE UNIQUE INDEX ledger_accounts_system_kind ON ledger_accounts (kind)
    WHERE owner_id IS NULL;

-- Well-known system accounts: top-ups are transfers cash_in -> consumer;
-- holds and captures are transfers consumer -> platform_revenue.
INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits) VALUES
    ('00000000-0000-4000-8000-000000000001', NULL, 'cash_in', false),
    ('00000000-0000-4000-8000-000000000002', NULL, 'platform_revenue', false);

CREATE TABLE transfers (
    id                  uuid PRIMARY KEY,
    debit_account_id    uuid NOT NULL REFERENCES ledger_accounts (id),
    credit_account_id   uuid NOT NULL REFERENCES ledger_accounts (id),
    amount              bigint NOT NULL CHECK (amount > 0),
    kind                text NOT NULL CHECK (kind IN ('top_up', 'hold', 'capture')),
    status              text NOT NULL
        CHECK (status IN ('posted', 'pending', 'settled', 'released')),
    captured            bigint NOT NULL DEFAULT 0 CHECK (captured >= 0 AND captured <= amount),
    -- For a capture: the hold it posts. UNIQUE: a hold is captured at most once.
    pending_id          uuid UNIQUE REFERENCES transfers (id),
    idempotency_key     text UNIQUE,
    -- Digest of the request parameters, to tell a replay from a reused key.
    request_fingerprint text,
    expires_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    resolved_at         timestamptz,
    CHECK (debit_account_id <> credit_account_id),
    CHECK ((kind = 'hold') = (status <> 'posted')),
    CHECK ((kind = 'hold') = (expires_at IS NOT NULL)),
    CHECK ((kind = 'capture') = (pending_id IS NOT NULL)),
    CHECK ((status = 'settled') = (captured > 0)),
    CHECK ((status IN ('settled', 'released')) = (resolved_at IS NOT NULL)),
    CHECK ((idempotency_key IS NULL) = (request_fingerprint IS NULL))
);
-- What the sweeper scans: open holds by expiry.
CREATE INDEX transfers_open_holds_expiry ON transfers (expires_at)
    WHERE kind = 'hold' AND status = 'pending';
CREATE INDEX transfers_debit_account ON transfers (debit_account_id, created_at);
CREATE INDEX transfers_credit_account ON transfers (credit_account_id, created_at);
