-- Ledger events, written in the transaction of what they report (settled usage,
-- contribution records) and relayed to the message broker afterwards.
CREATE TABLE ledger_outbox (
    id           uuid PRIMARY KEY,
    seq          bigserial NOT NULL,
    kind         text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX ledger_outbox_unpublished ON ledger_outbox (seq) WHERE published_at IS NULL;

-- The operator earnings projection: totals per operator and epoch, built from
-- contribution events; each event counts once (projected_events).
CREATE TABLE operator_earnings (
    operator_account_id uuid NOT NULL,
    epoch               bigint NOT NULL,
    jobs                bigint NOT NULL,
    tokens              bigint NOT NULL,
    amount              bigint NOT NULL,
    PRIMARY KEY (operator_account_id, epoch)
);

CREATE TABLE projected_events (
    event_id     uuid PRIMARY KEY,
    projected_at timestamptz NOT NULL DEFAULT now()
);
