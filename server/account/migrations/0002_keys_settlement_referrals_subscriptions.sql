-- Profiles, key scopes and keyed hashes, operator earnings and the
-- promotional pool, settlement shares, contribution records, referrals and
-- subscriptions.

-- Profiles and referral links.
ALTER TABLE accounts
    ADD COLUMN email          text NOT NULL DEFAULT '',
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN referral_code  text UNIQUE,
    ADD COLUMN referred_by    uuid REFERENCES accounts (id),
    ADD CONSTRAINT accounts_not_self_referred CHECK (referred_by <> id);
CREATE INDEX accounts_created ON accounts (created_at, id);
CREATE INDEX accounts_referred_by ON accounts (referred_by) WHERE referred_by IS NOT NULL;

-- Keys are now stored as HMAC-SHA256 under a server secret. Keys hashed the
-- old way (unkeyed SHA-256) cannot be converted without their secret, so
-- they are retired and must be re-issued.
UPDATE api_keys SET revoked_at = now() WHERE revoked_at IS NULL;
ALTER TABLE api_keys
    ADD COLUMN scopes         text[] NOT NULL DEFAULT '{inference}',
    ADD COLUMN expires_at     timestamptz,
    ADD COLUMN allowed_models text[] NOT NULL DEFAULT '{}',
    ADD COLUMN subcloud_id    text NOT NULL DEFAULT '',
    ADD CONSTRAINT api_keys_scopes_known
        CHECK (scopes <@ ARRAY['inference', 'management', 'admin']::text[]);

-- Ledger accounts: operator earnings per user, and the promotional pool,
-- which may only pay out what it was funded with.
ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_kind_check;
ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_system_has_no_owner;
ALTER TABLE ledger_accounts
    ADD CONSTRAINT ledger_accounts_kind_check CHECK (
        kind IN ('consumer', 'operator', 'platform_revenue', 'promo_pool', 'cash_in')),
    ADD CONSTRAINT ledger_accounts_system_has_no_owner CHECK (
        (owner_id IS NULL) = (kind IN ('platform_revenue', 'promo_pool', 'cash_in')));
INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits) VALUES
    ('00000000-0000-4000-8000-000000000003', NULL, 'promo_pool', true);
INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits)
    SELECT gen_random_uuid(), id, 'operator', true FROM accounts;

-- Transfers: new kinds; a settled hold may post one capture per credited
-- account (the platform and each operator).
ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check CHECK (kind IN (
    'top_up', 'hold', 'capture', 'grant', 'promo_fund', 'referral_bonus',
    'subscription_allowance'));
ALTER TABLE transfers DROP CONSTRAINT transfers_pending_id_key;
ALTER TABLE transfers ADD CONSTRAINT transfers_capture_once_per_account
    UNIQUE (pending_id, credit_account_id);
-- Digest of the settlement's parameters, to tell a replay from a conflicting settle.
ALTER TABLE transfers ADD COLUMN settle_fingerprint text;

-- How a capture is shared, and how contributions are grouped in epochs.
CREATE TABLE settlement_policy (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    operator_share_bps integer NOT NULL CHECK (operator_share_bps BETWEEN 0 AND 10000),
    epoch_seconds      integer NOT NULL CHECK (epoch_seconds > 0)
);
INSERT INTO settlement_policy (operator_share_bps, epoch_seconds) VALUES (8000, 86400);

-- Contribution records (RCP): one per settled hold per operator.
CREATE TABLE contributions (
    id                  uuid PRIMARY KEY,
    hold_id             uuid NOT NULL REFERENCES transfers (id),
    operator_account_id uuid NOT NULL REFERENCES accounts (id),
    node_id             text NOT NULL,
    model               text NOT NULL,
    tokens              bigint NOT NULL CHECK (tokens >= 0),
    amount              bigint NOT NULL CHECK (amount >= 0),
    epoch               bigint NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (hold_id, operator_account_id)
);
CREATE INDEX contributions_operator ON contributions (operator_account_id, created_at, id);

-- Referral rules (one row) and the bonuses paid, one row per rewarded top-up.
CREATE TABLE referral_rules (
    id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
    bonus_bps          integer NOT NULL CHECK (bonus_bps BETWEEN 0 AND 10000),
    rewarded_top_ups   integer NOT NULL CHECK (rewarded_top_ups >= 0),
    max_bonus          bigint NOT NULL CHECK (max_bonus >= 0)
);
INSERT INTO referral_rules (bonus_bps, rewarded_top_ups, max_bonus) VALUES (1000, 3, 10000000);

CREATE TABLE referral_bonuses (
    top_up_id    uuid PRIMARY KEY REFERENCES transfers (id),
    transfer_id  uuid NOT NULL UNIQUE REFERENCES transfers (id),
    referrer_id  uuid NOT NULL REFERENCES accounts (id),
    referee_id   uuid NOT NULL REFERENCES accounts (id),
    amount       bigint NOT NULL CHECK (amount > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX referral_bonuses_referee ON referral_bonuses (referee_id);
CREATE INDEX referral_bonuses_referrer ON referral_bonuses (referrer_id);

-- Subscriptions.
CREATE TABLE plans (
    id                uuid PRIMARY KEY,
    name              text NOT NULL,
    monthly_price     bigint NOT NULL CHECK (monthly_price >= 0),
    monthly_allowance bigint NOT NULL CHECK (monthly_allowance >= 0),
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    plan_id         uuid NOT NULL REFERENCES plans (id),
    status          text NOT NULL CHECK (status IN ('active', 'cancelled')),
    started_at      timestamptz NOT NULL,
    -- Allowances granted so far; period n starts at started_at + n months.
    periods_granted integer NOT NULL DEFAULT 0 CHECK (periods_granted >= 0),
    cancelled_at    timestamptz,
    CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL))
);
CREATE UNIQUE INDEX subscriptions_one_active ON subscriptions (account_id)
    WHERE status = 'active';
