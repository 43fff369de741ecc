"""PostgreSQL adapter of holds: reserve, settle (captures, operator shares, RCP), expire."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from core.errors import InsufficientQuota, NotFound
from server.account.ledger import (
    Hold,
    HoldStatus,
    SettlementLine,
    ensure_same_request,
    resolve_hold,
    split_capture,
)
from server.account.ledger_sql import (
    CURRENT_POLICY,
    PLATFORM_REVENUE_ID,
    Connection,
    Delta,
    Record,
    apply_deltas,
    policy_from_row,
)

_HOLD_COLUMNS = """t.id, la.owner_id, t.amount, t.captured, t.status, t.expires_at,
                   t.request_fingerprint"""
_HOLD_FROM = "transfers t JOIN ledger_accounts la ON la.id = t.debit_account_id"
# The CHECK constraint that keeps a consumer's debits (pending and posted) within its credits.
_DEBITS_WITHIN_CREDITS = "ledger_accounts_debits_within_credits"


def _hold(row: Record) -> Hold:
    return Hold(
        hold_id=row["id"],
        account_id=row["owner_id"],
        amount=row["amount"],
        captured=row["captured"],
        status=HoldStatus(row["status"]),
        expires_at=row["expires_at"],
    )


class PostgresHoldStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold:
        """Reserves ``amount`` in one statement (one round trip, its own transaction).

        The reservation is refused by the consumer account's CHECK constraint (debits
        within credits), evaluated on the locked row: a concurrent hold on the same
        account waits for the row and is then checked against the new totals, so
        check and reserve are one atomic step and an account is never overspent.
        Lock order: the consumer's ledger account, then the platform's.
        """
        async with self._pool.acquire() as conn:
            try:
                row = await conn.fetchrow(
                    """WITH consumer AS (
                           SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = 'consumer'
                       ), hold AS (
                           INSERT INTO transfers (id, debit_account_id, credit_account_id, amount,
                                                  kind, status, idempotency_key,
                                                  request_fingerprint, expires_at)
                           SELECT $2::uuid, consumer.id, $3::uuid, $4::bigint, 'hold', 'pending',
                                  $5::text, $6::text, $7::timestamptz
                           FROM consumer
                           ON CONFLICT (idempotency_key) DO NOTHING
                           RETURNING id, debit_account_id, amount, captured, status, expires_at
                       ), reserved AS (
                           UPDATE ledger_accounts la
                           SET debits_pending = la.debits_pending + hold.amount
                           FROM hold WHERE la.id = hold.debit_account_id
                           RETURNING la.id
                       ), credited AS (
                           UPDATE ledger_accounts SET credits_pending = credits_pending + $4
                           WHERE id = $3 AND EXISTS (SELECT FROM reserved)
                           RETURNING id
                       )
                       SELECT EXISTS (SELECT FROM consumer) AS account_exists,
                              EXISTS (SELECT FROM credited) AS credited,
                              hold.id, $1::uuid AS owner_id, hold.amount, hold.captured,
                              hold.status, hold.expires_at
                       FROM (VALUES (true)) AS one LEFT JOIN hold ON true""",
                    account_id,
                    uuid4(),
                    PLATFORM_REVENUE_ID,
                    amount,
                    idempotency_key,
                    fingerprint,
                    expires_at,
                )
            except asyncpg.CheckViolationError as error:
                if error.constraint_name != _DEBITS_WITHIN_CREDITS:
                    raise
                raise InsufficientQuota(
                    f"Not enough available credits for a hold of {amount} micro-credits"
                ) from None
            assert row is not None  # the outer join always yields one row
            if not row["account_exists"]:
                raise NotFound(f"Account {account_id} not found")
            if row["id"] is None:
                # The key was used before: a replay returns the first hold.
                existing = await conn.fetchrow(
                    f"SELECT {_HOLD_COLUMNS} FROM {_HOLD_FROM} WHERE t.idempotency_key = $1",
                    idempotency_key,
                )
                assert existing is not None  # the conflicting row is committed
                ensure_same_request(existing["request_fingerprint"], fingerprint)
                return _hold(existing)
            assert row["credited"]  # the platform's pending credit moved with the reservation
            return _hold(row)

    async def settle_hold(
        self,
        hold_id: UUID,
        capture: int,
        lines: Sequence[SettlementLine],
        total_tokens: int,
        fingerprint: str,
    ) -> Hold:
        """Captures ``capture`` (platform fee + operator shares + RCP), releases the rest.

        One transaction: the hold's row is locked first (as the sweeper locks it), so
        it resolves at most once; a hold no longer pending is a replay or a refusal.
        Then the ledger accounts' totals move in lock order, each update locking its
        row itself, and the resolution, captures and contribution records are written.
        """
        owners = [line.operator_account_id for line in lines]
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_READ_FOR_SETTLEMENT, hold_id, owners)
            if row is None:
                raise NotFound(f"Hold {hold_id} not found")
            hold = _hold(row)
            status = resolve_hold(hold, capture, fingerprint, row["settle_fingerprint"])
            if status is None:
                return hold
            await _write_settlement(conn, row, status, capture, lines, total_tokens, fingerprint)
        return Hold(hold.hold_id, hold.account_id, hold.amount, capture, status, hold.expires_at)

    async def release_expired_holds(self, limit: int) -> int:
        """Releases up to ``limit`` expired holds in one transaction.

        SKIP LOCKED lets several sweepers (replicas) work side by side and
        leaves alone holds being settled right now; the status condition,
        re-checked under the row lock, resolves each hold at most once.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """WITH expired AS (
                       SELECT id FROM transfers
                       WHERE kind = 'hold' AND status = 'pending' AND expires_at < now()
                       ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                   UPDATE transfers t SET status = 'released', resolved_at = now()
                   FROM expired WHERE t.id = expired.id
                   RETURNING t.debit_account_id, t.credit_account_id, t.amount""",
                limit,
            )
            deltas: dict[UUID, Delta] = defaultdict(Delta)
            for row in rows:
                deltas[row["debit_account_id"]].debits_pending -= row["amount"]
                deltas[row["credit_account_id"]].credits_pending -= row["amount"]
            await apply_deltas(conn, deltas)
        return len(rows)


# A hold with what settling it needs: its operators' ledger accounts (pairs of owner
# and ledger account) and the policy in force.
_READ_FOR_SETTLEMENT = f"""
    SELECT {_HOLD_COLUMNS}, t.debit_account_id, t.credit_account_id, t.settle_fingerprint,
           (SELECT array_agg(ARRAY[o.owner_id, o.id]) FROM ledger_accounts o
            WHERE o.kind = 'operator' AND o.owner_id = ANY($2::uuid[])) AS operators,
           (SELECT p FROM {CURRENT_POLICY}) AS policy
    FROM {_HOLD_FROM} WHERE t.id = $1 AND t.kind = 'hold'
    FOR NO KEY UPDATE OF t"""

# The hold's resolution, its captures, the contribution records and their events
# in the outbox, in one statement (the running totals moved before, in lock order).
_WRITE_SETTLEMENT = """
    WITH resolved AS (
        UPDATE transfers SET status = $2, captured = $3, resolved_at = now(),
                             settle_fingerprint = $4
        WHERE id = $1
    ), captures AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status,
                               pending_id)
        SELECT c.id, $5, c.credit, c.amount, 'capture', 'posted', $1
        FROM unnest($6::uuid[], $7::uuid[], $8::bigint[]) AS c(id, credit, amount)
    ), recorded AS (
        INSERT INTO contributions (id, hold_id, operator_account_id, node_id, model, tokens,
                                   amount, epoch)
        SELECT r.id, $1, r.operator, r.node, r.model, r.tokens, r.amount,
               floor(extract(epoch FROM now()) / $9)::bigint
        FROM unnest($10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::bigint[],
                    $15::bigint[]) AS r(id, operator, node, model, tokens, amount)
        RETURNING id, operator_account_id, node_id, model, tokens, amount, epoch, created_at
    )
    INSERT INTO ledger_outbox (id, kind, payload)
    SELECT gen_random_uuid(), 'usage.settled',
           jsonb_build_object('hold_id', $1::uuid, 'account_id', $16::uuid, 'status', $2::text,
                              'held', $17::bigint, 'captured', $3::bigint,
                              'total_tokens', $18::bigint, 'settled_at', now())
    UNION ALL
    SELECT gen_random_uuid(), 'contribution.recorded',
           jsonb_build_object('contribution_id', id, 'hold_id', $1::uuid,
                              'operator_account_id', operator_account_id, 'node_id', node_id,
                              'model', model, 'tokens', tokens, 'amount', amount,
                              'epoch', epoch, 'recorded_at', created_at)
    FROM recorded"""


async def _write_settlement(
    conn: Connection,
    row: Record,
    status: HoldStatus,
    capture: int,
    lines: Sequence[SettlementLine],
    total_tokens: int,
    fingerprint: str,
) -> None:
    """Writes the settlement of the pending hold in ``row``, locked by the caller."""
    if status is HoldStatus.RELEASED:
        lines = ()
    operators = _operator_accounts(row["operators"] or (), lines)
    policy = policy_from_row(row["policy"])
    parts, platform = split_capture(
        capture, policy.operator_share_bps, [x.tokens for x in lines], total_tokens
    )
    consumer, revenue, amount = row["debit_account_id"], row["credit_account_id"], row["amount"]
    captures = [(revenue, platform)] + [
        (operators[line.operator_account_id], part) for line, part in zip(lines, parts, strict=True)
    ]
    captures = [(credit, moved) for credit, moved in captures if moved]
    deltas: dict[UUID, Delta] = defaultdict(Delta)
    deltas[consumer].debits_pending -= amount
    deltas[consumer].debits_posted += capture
    deltas[revenue].credits_pending -= amount
    deltas[revenue].credits_posted += platform
    for line, part in zip(lines, parts, strict=True):
        if part:
            deltas[operators[line.operator_account_id]].credits_posted += part
    await apply_deltas(conn, deltas)
    await conn.execute(
        _WRITE_SETTLEMENT,
        row["id"],
        status.value,
        capture,
        fingerprint,
        consumer,
        [uuid4() for _ in captures],
        [credit for credit, _ in captures],
        [moved for _, moved in captures],
        policy.epoch_seconds,
        [uuid4() for _ in lines],
        [line.operator_account_id for line in lines],
        [line.node_id for line in lines],
        [line.model for line in lines],
        [line.tokens for line in lines],
        parts,
        row["owner_id"],
        amount,
        total_tokens,
    )


def _operator_accounts(
    found: Sequence[Sequence[UUID]], lines: Sequence[SettlementLine]
) -> dict[UUID, UUID]:
    """Each line's operator's ledger account, from (owner, ledger account) pairs."""
    accounts = {owner: account for owner, account in found}
    for line in lines:
        if line.operator_account_id not in accounts:
            raise NotFound(f"Operator account {line.operator_account_id} not found")
    return accounts
