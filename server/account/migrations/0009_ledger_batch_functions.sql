-- Batches of holds and settlements in one statement each (server/account/hold_store.py,
-- hold_settlement.py): rows are updated one at a time in the order the ledger's lock
-- order asks, which a single UPDATE of many rows does not promise, so that a batch
-- costs one round trip and still never deadlocks.

-- Adds each delta to the running totals of its ledger account, in the order given
-- (the caller sorts them: user accounts by id, then system accounts by id). An
-- account that may not go negative fails its CHECK constraint, as always.
CREATE FUNCTION ledger_move(
    p_accounts uuid[], p_debits_pending bigint[], p_debits_posted bigint[],
    p_credits_pending bigint[], p_credits_posted bigint[]
) RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_accounts, 1), 0) LOOP
        UPDATE ledger_accounts
        SET debits_pending = debits_pending + p_debits_pending[i],
            debits_posted = debits_posted + p_debits_posted[i],
            credits_pending = credits_pending + p_credits_pending[i],
            credits_posted = credits_posted + p_credits_posted[i]
        WHERE id = p_accounts[i];
    END LOOP;
    RETURN coalesce(array_length(p_accounts, 1), 0);
END $$;

-- Reserves a batch of holds (distinct idempotency keys): inserts them (a key used
-- before inserts nothing), then, consumer by consumer in id order and in the batch's
-- order for each, reserves a hold only if the account's available credits still cover
-- it, under its row lock, and takes a refused hold out again; the holds reserved
-- credit the platform's shard p_revenue. Lock order as for one hold: the new holds'
-- keys, the consumers' ledger accounts, the shard. Returns each hold inserted and
-- whether it was reserved; a hold not returned was not inserted.
CREATE FUNCTION ledger_reserve_holds(
    p_ids uuid[], p_owners uuid[], p_amounts bigint[], p_keys text[],
    p_fingerprints text[], p_expires timestamptz[], p_revenue uuid
) RETURNS TABLE (hold_id uuid, reserved boolean) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    holds uuid[];
    consumers uuid[];
    amounts bigint[];
    total bigint := 0;
BEGIN
    WITH inserted AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status,
                               idempotency_key, request_fingerprint, expires_at)
        SELECT h.id, la.id, p_revenue, h.amount, 'hold', 'pending', h.key, h.fingerprint,
               h.expires_at
        FROM unnest(p_ids, p_owners, p_amounts, p_keys, p_fingerprints, p_expires)
             AS h(id, owner_id, amount, key, fingerprint, expires_at)
        JOIN ledger_accounts la ON la.owner_id = h.owner_id AND la.kind = 'consumer'
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id, debit_account_id, amount
    )
    SELECT array_agg(i.id ORDER BY i.debit_account_id, o.n),
           array_agg(i.debit_account_id ORDER BY i.debit_account_id, o.n),
           array_agg(i.amount ORDER BY i.debit_account_id, o.n)
    INTO holds, consumers, amounts
    FROM inserted i JOIN unnest(p_ids) WITH ORDINALITY AS o(id, n) ON o.id = i.id;

    FOR i IN 1 .. coalesce(array_length(holds, 1), 0) LOOP
        UPDATE ledger_accounts SET debits_pending = debits_pending + amounts[i]
        WHERE id = consumers[i]
          AND credits_posted - debits_posted - debits_pending >= amounts[i];
        reserved := FOUND;
        IF reserved THEN
            total := total + amounts[i];
        ELSE
            DELETE FROM transfers WHERE id = holds[i];
        END IF;
        hold_id := holds[i];
        RETURN NEXT;
    END LOOP;

    UPDATE ledger_accounts SET credits_pending = credits_pending + total
    WHERE id = p_revenue AND total > 0;
END $$;
