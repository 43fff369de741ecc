"""PostgreSQL adapter of holds: reserve, settle (captures, operator shares, RCP), expire.

Concurrent holds, and concurrent settlements, are committed in groups
(server/common/batcher.py): a lone call runs alone; under load one statement
carries a batch of them (a hold: one statement; a settlement: a read and one
statement, hold_settlement.py), so that its round trip, its commit and each
account's update serve them all, as TigerBeetle batches transfers. Every
decision is still taken per call under the rows' locks: no hold is ever
reserved beyond its account's credits, each resolves at most once.
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
from server.account.ledger_sql import PLATFORM_REVENUE, Delta, Record, apply_deltas
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
        """Reserves a batch of holds (distinct keys) in one statement, ledger_reserve_holds
        (migration 0009): each is reserved, consumer by consumer and in the batch's order,
        only if its account still covers it, under the account's row lock. A key used
        before, or an unknown account, inserts nothing and is left to the single path.
        """
        ids = [uuid4() for _ in requests]
        rows = await self._pool.fetch(
            "SELECT hold_id, reserved FROM ledger_reserve_holds($1, $2, $3, $4, $5, $6, $7)",
            ids,
            [r.account_id for r in requests],
            [r.amount for r in requests],
            [r.idempotency_key for r in requests],
            [r.fingerprint for r in requests],
            [r.expires_at for r in requests],
            PLATFORM_REVENUE.any_shard(),
        )
        reserved = {row["hold_id"]: row["reserved"] for row in rows}
        outcomes: list[Hold | Exception | None] = []
        for hold_id, request in zip(ids, requests, strict=True):
            if hold_id not in reserved:
                outcomes.append(None)
            elif reserved[hold_id]:
                outcomes.append(
                    Hold(
                        hold_id,
                        request.account_id,
                        request.amount,
                        0,
                        HoldStatus.OPEN,
                        request.expires_at,
                    )
                )
            else:
                outcomes.append(_insufficient(request.amount))
        return outcomes

    async def _settle_one(self, settlement: Settlement) -> Hold:
        """One settlement (hold_settlement.py). When the hold was resolved by someone
        else between its read and its write, reading it again decides: a replay or a
        refusal."""
        for _ in range(2):
            (outcome,) = await settle(self._pool, [settlement])
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is not None:
                return outcome
        raise RuntimeError(f"hold {settlement.hold_id} changed under two settlements in a row")

    async def _settle_many(
        self, settlements: Sequence[Settlement]
    ) -> list[Hold | Exception | None]:
        """A batch of settlements (distinct holds); one whose hold was resolved by
        someone else meanwhile is settled again alone."""
        return list(await settle(self._pool, settlements))

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
