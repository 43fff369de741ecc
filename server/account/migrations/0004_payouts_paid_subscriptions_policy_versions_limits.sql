-- Operator payouts through a cash-out account, paid subscriptions whose
-- allowances expire, a versioned settlement policy, and stored rate limits.

-- Cash-out: where operators' earnings leave the platform for real money.
ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_kind_check;
ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_system_has_no_owner;
ALTER TABLE ledger_accounts
    ADD CONSTRAINT ledger_accounts_kind_check CHECK (
        kind IN ('consumer', 'operator', 'platform_revenue', 'promo_pool', 'cash_in', 'cash_out')),
    ADD CONSTRAINT ledger_accounts_system_has_no_owner CHECK (
        (owner_id IS NULL) = (kind IN ('platform_revenue', 'promo_pool', 'cash_in', 'cash_out')));
INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits) VALUES
    ('00000000-0000-4000-8000-000000000004', NULL, 'cash_out', false);

-- New transfer kinds. A payout is a reservation like a hold (pending, then
-- settled by a capture or released) but never expires: only an admin
-- resolves it, and the hold sweeper does not see it.
ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check CHECK (kind IN (
    'top_up', 'hold', 'capture', 'grant', 'promo_fund', 'referral_bonus',
    'subscription_allowance', 'subscription_charge', 'allowance_expiry', 'payout'));
ALTER TABLE transfers DROP CONSTRAINT transfers_check2;
ALTER TABLE transfers ADD CONSTRAINT transfers_reservation_not_posted
    CHECK ((kind IN ('hold', 'payout')) = (status <> 'posted'));

CREATE TABLE payouts (
    id                  uuid PRIMARY KEY,
    account_id          uuid NOT NULL REFERENCES accounts (id),
    amount              bigint NOT NULL CHECK (amount > 0),
    status              text NOT NULL CHECK (status IN ('requested', 'completed', 'rejected')),
    -- The reservation (kind 'payout') on the operator's earnings.
    transfer_id         uuid NOT NULL UNIQUE REFERENCES transfers (id),
    idempotency_key     text NOT NULL UNIQUE,
    request_fingerprint text NOT NULL,
    -- Set by the admin who resolved it: the payment reference, or why it was rejected.
    note                text NOT NULL DEFAULT '',
    requested_at        timestamptz NOT NULL DEFAULT now(),
    resolved_at         timestamptz,
    CHECK ((status = 'requested') = (resolved_at IS NULL))
);
CREATE INDEX payouts_account ON payouts (account_id, requested_at, id);
CREATE INDEX payouts_requested ON payouts (requested_at, id);

-- Settlement policy, versioned: the newest row applies. Operators' share and
-- platform fee are basis points of a capture and add up to 10,000.
CREATE TABLE settlement_policies (
    version            integer PRIMARY KEY CHECK (version > 0),
    operator_share_bps integer NOT NULL CHECK (operator_share_bps BETWEEN 0 AND 10000),
    platform_fee_bps   integer NOT NULL CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    epoch_seconds      integer NOT NULL CHECK (epoch_seconds > 0),
    min_payout         bigint NOT NULL CHECK (min_payout > 0),
    max_payout         bigint NOT NULL CHECK (max_payout >= min_payout),
    created_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (operator_share_bps + platform_fee_bps = 10000)
);
INSERT INTO settlement_policies (version, operator_share_bps, platform_fee_bps, epoch_seconds,
                                 min_payout, max_payout)
    SELECT 1, operator_share_bps, 10000 - operator_share_bps, epoch_seconds,
           1000000, 1000000000000 FROM settlement_policy;
DROP TABLE settlement_policy;

-- Subscriptions: renewal charges the price; one that cannot be paid lapses.
ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_status_check;
ALTER TABLE subscriptions
    ADD CONSTRAINT subscriptions_status_check
        CHECK (status IN ('active', 'cancelled', 'lapsed')),
    ADD COLUMN lapsed_at timestamptz,
    ADD CONSTRAINT subscriptions_lapsed_at CHECK ((status = 'lapsed') = (lapsed_at IS NOT NULL));

-- One row per paid period: what was charged and granted, and, once the
-- period has ended, what of the allowance went back unused. Periods granted
-- before this migration have no row and do not expire.
CREATE TABLE subscription_periods (
    subscription_id    uuid NOT NULL REFERENCES subscriptions (id),
    period             integer NOT NULL CHECK (period >= 0),
    starts_at          timestamptz NOT NULL,
    ends_at            timestamptz NOT NULL CHECK (ends_at > starts_at),
    price              bigint NOT NULL CHECK (price >= 0),
    allowance          bigint NOT NULL CHECK (allowance >= 0),
    charge_transfer_id uuid REFERENCES transfers (id),
    grant_transfer_id  uuid REFERENCES transfers (id),
    expired_at         timestamptz,
    returned           bigint CHECK (returned >= 0),
    PRIMARY KEY (subscription_id, period),
    CHECK ((expired_at IS NULL) = (returned IS NULL))
);
CREATE INDEX subscription_periods_to_expire ON subscription_periods (ends_at)
    WHERE expired_at IS NULL;
-- What allowance expiry scans: a consumer's captures within a period.
CREATE INDEX transfers_captures_by_debit ON transfers (debit_account_id, created_at)
    WHERE kind = 'capture';

-- Stored rate limits; NULL means the platform default applies.
ALTER TABLE api_keys
    ADD COLUMN requests_per_minute integer CHECK (requests_per_minute > 0),
    ADD COLUMN tokens_per_minute   integer CHECK (tokens_per_minute > 0),
    ADD COLUMN concurrent_requests integer CHECK (concurrent_requests > 0);
ALTER TABLE accounts
    ADD COLUMN requests_per_minute integer CHECK (requests_per_minute > 0),
    ADD COLUMN tokens_per_minute   integer CHECK (tokens_per_minute > 0),
    ADD COLUMN concurrent_requests integer CHECK (concurrent_requests > 0);
