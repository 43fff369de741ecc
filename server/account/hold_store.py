"""PostgreSQL adapter of holds: reserve, settle (captures, operator shares, RCP), expire.

Concurrent holds, and concurrent settlements, are committed in groups
(server/common/batcher.py): a lone call runs alone, as one statement (a hold)
or one transaction (a settlement, hold_settlement.py); under load one
transaction carries a batch of them, so that its round trips, its commit and
each account's update serve them all, as TigerBeetle batches transfers.
Every decision is still taken per call under the rows' locks: no hold is
ever reserved beyond its account's credits, each resolves at most once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from core.errors import InsufficientQuota, NotFound
from server.account.hold_settlement import (
    HOLD_COLUMNS,
    HOLD_FROM,
    Settlement,
    hold_from_row,
    settle,
)
from server.account.ledger import Hold, HoldStatus, SettlementLine, ensure_same_request
from server.account.ledger_sql import (
    PLATFORM_REVENUE,
    Delta,
    Record,
    apply_deltas,
    deltas_sql,
    transaction,
    uuid_literal,
)
from server.common.batcher import Batcher

# The CHECK constraint that keeps a consumer's debits (pending and posted) within its credits.
_DEBITS_WITHIN_CREDITS = "ledger_accounts_debits_within_credits"
# Calls one batch carries at most, and batches of each kind in flight at once.
MAX_BATCH = 64
MAX_IN_FLIGHT = 2


@dataclass(frozen=True)
class _HoldRequest:
    account_id: UUID
    amount: int
    expires_at: datetime
    idempotency_key: str
    fingerprint: str


class PostgresHoldStore:
    def __init__(
        self,
        pool: asyncpg.Pool[Record],
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._pool = pool
        self._holds = Batcher(
            self._create_one,
            self._create_many,
            key=lambda request: request.idempotency_key,
            max_size=max_batch,
            max_in_flight=max_in_flight,
        )
        self._settlements = Batcher(
            self._settle_one,
            self._settle_many,
            key=lambda settlement: settlement.hold_id,
            max_size=max_batch,
            max_in_flight=max_in_flight,
        )

    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold:
        """Reserves ``amount`` on the account, or refuses: InsufficientQuota, NotFound,
        or IdempotencyKeyReused for a key used before with other parameters."""
        request = _HoldRequest(account_id, amount, expires_at, idempotency_key, fingerprint)
        return await self._holds.submit(request)

    async def settle_hold(
        self,
        hold_id: UUID,
        capture: int,
        lines: Sequence[SettlementLine],
        total_tokens: int,
        fingerprint: str,
    ) -> Hold:
        """Captures ``capture`` (platform fee + operator shares + RCP), releases the rest."""
        settlement = Settlement(hold_id, capture, tuple(lines), total_tokens, fingerprint)
        return await self._settlements.submit(settlement)

    async def _create_one(self, request: _HoldRequest) -> Hold:
        """Reserves ``amount`` in one statement (one round trip, its own transaction).

        The reservation is refused by the consumer account's CHECK constraint (debits
        within credits), evaluated on the locked row: a concurrent hold on the same
        account waits for the row and is then checked against the new totals, so
        check and reserve are one atomic step and an account is never overspent.
        Lock order: the consumer's ledger account, then the platform's.
        """
        account_id, amount = request.account_id, request.amount
        idempotency_key, fingerprint = request.idempotency_key, request.fingerprint
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
                    PLATFORM_REVENUE.any_shard(),
                    amount,
                    idempotency_key,
                    fingerprint,
                    request.expires_at,
                )
            except asyncpg.CheckViolationError as error:
                if error.constraint_name != _DEBITS_WITHIN_CREDITS:
                    raise
                raise _insufficient(amount) from None
            assert row is not None  # the outer join always yields one row
            if not row["account_exists"]:
                raise NotFound(f"Account {account_id} not found")
            if row["id"] is None:
                # The key was used before: a replay returns the first hold.
                existing = await conn.fetchrow(
                    f"SELECT {HOLD_COLUMNS} FROM {HOLD_FROM} WHERE t.idempotency_key = $1",
                    idempotency_key,
                )
                assert existing is not None  # the conflicting row is committed
                ensure_same_request(existing["request_fingerprint"], fingerprint)
                return hold_from_row(existing)
            assert row["credited"]  # the platform's pending credit moved with the reservation
            return hold_from_row(row)

    async def _create_many(self, requests: Sequence[_HoldRequest]) -> list[Hold | Exception | None]:
        """Reserves a batch of holds (distinct keys) in one transaction.

        One statement inserts the holds and then locks their consumers' ledger
        accounts in id order, reading what each has available; each hold is then
        granted, in the batch's order, only if its account still covers it. With
        the COMMIT go the removal of the refused holds and the reservations: the
        consumers' pending debits and the pending credit of one platform shard.
        Lock order as for one hold: the new holds' keys, the consumers' ledger
        accounts, the shard. A key used before, or an unknown account, inserts
        nothing and is left to the single path.
        """
        revenue = PLATFORM_REVENUE.any_shard()
        ids = [uuid4() for _ in requests]
        outcomes: list[Hold | Exception | None] = [None] * len(requests)
        async with transaction(self._pool) as tx:
            rows = await tx.conn.fetch(
                _INSERT_HOLDS,
                ids,
                [r.account_id for r in requests],
                [r.amount for r in requests],
                [r.idempotency_key for r in requests],
                [r.fingerprint for r in requests],
                [r.expires_at for r in requests],
                revenue,
            )
            inserted = {row["id"]: row["debit_account_id"] for row in rows}
            available = {row["debit_account_id"]: row["available"] for row in rows}
            reserved: dict[UUID, Delta] = defaultdict(Delta)
            refused = []
            for i, (hold_id, request) in enumerate(zip(ids, requests, strict=True)):
                consumer = inserted.get(hold_id)
                if consumer is None:
                    continue
                if available[consumer] < request.amount:
                    refused.append(hold_id)
                    outcomes[i] = _insufficient(request.amount)
                    continue
                available[consumer] -= request.amount
                reserved[consumer].debits_pending += request.amount
                reserved[revenue].credits_pending += request.amount
                outcomes[i] = Hold(
                    hold_id,
                    request.account_id,
                    request.amount,
                    0,
                    HoldStatus.OPEN,
                    request.expires_at,
                )
            if refused:
                ids_sql = ", ".join(uuid_literal(hold_id) for hold_id in refused)
                tx.finally_run(f"DELETE FROM transfers WHERE id IN ({ids_sql});")
            tx.finally_run(deltas_sql(reserved))
        return outcomes

    async def _settle_one(self, settlement: Settlement) -> Hold:
        """One settlement, one transaction (hold_settlement.py)."""
        async with transaction(self._pool) as tx:
            (outcome,) = await settle(tx, [settlement])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _settle_many(self, settlements: Sequence[Settlement]) -> list[Hold | Exception]:
        """A batch of settlements (distinct holds), one transaction."""
        async with transaction(self._pool) as tx:
            return list(await settle(tx, settlements))

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


def _insufficient(amount: int) -> InsufficientQuota:
    return InsufficientQuota(f"Not enough available credits for a hold of {amount} micro-credits")


# A batch's holds, inserted (a key used before inserts nothing), then their consumers'
# ledger accounts locked in id order, with what each has available.
_INSERT_HOLDS = """
    WITH hold AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status,
                               idempotency_key, request_fingerprint, expires_at)
        SELECT h.id, la.id, $7::uuid, h.amount, 'hold', 'pending', h.key, h.fingerprint,
               h.expires_at
        FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[],
                    $6::timestamptz[]) AS h(id, owner_id, amount, key, fingerprint, expires_at)
        JOIN ledger_accounts la ON la.owner_id = h.owner_id AND la.kind = 'consumer'
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING id, debit_account_id
    ), consumer AS (
        SELECT id, credits_posted - debits_posted - debits_pending AS available
        FROM ledger_accounts WHERE id IN (SELECT debit_account_id FROM hold)
        ORDER BY id FOR NO KEY UPDATE
    )
    SELECT hold.id, hold.debit_account_id, consumer.available
    FROM hold JOIN consumer ON consumer.id = hold.debit_account_id"""
