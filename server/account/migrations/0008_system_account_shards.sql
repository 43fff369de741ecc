-- The system accounts every transaction touches are each kept in several rows,
-- shards, so that concurrent holds, captures and top-ups lock different rows.
-- A transfer names one shard; an account's totals are the sum of its shards'.
-- Shard 0 is the row each account had so far (same id); shard s of the account
-- whose id ends in N has the id 00000000-0000-4000-80ss-00000000000N (ss = s in
-- hex). The promotional pool stays one row: its CHECK constraint is what keeps
-- it from paying out more than it was funded with.
ALTER TABLE ledger_accounts ADD COLUMN shard smallint NOT NULL DEFAULT 0,
    ADD CONSTRAINT ledger_accounts_shards_are_system CHECK (
        shard = 0 OR kind IN ('platform_revenue', 'cash_in', 'cash_out'));
DROP INDEX ledger_accounts_system_kind;
CREATE UNIQUE INDEX ledger_accounts_system_kind_shard ON ledger_accounts (kind, shard)
    WHERE owner_id IS NULL;

INSERT INTO ledger_accounts (id, owner_id, kind, shard, debits_must_not_exceed_credits)
SELECT ('00000000-0000-4000-80' || lpad(to_hex(s), 2, '0') || '-00000000000' || a.n)::uuid,
       NULL, a.kind, s, false
FROM (VALUES (1, 'cash_in'), (2, 'platform_revenue'), (4, 'cash_out')) AS a(n, kind),
     generate_series(1, 15) AS s;
