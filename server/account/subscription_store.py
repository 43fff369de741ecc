"""PostgreSQL adapter of subscriptions; allowances are posted through the ledger store."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import asyncpg

from server.account.ledger_store import PostgresLedgerStore
from server.account.subscriptions import Plan, Subscription, SubscriptionStatus, period_index
from server.common.errors import FailedPrecondition, NotFound

Record = asyncpg.Record
if TYPE_CHECKING:
    Connection = asyncpg.pool.PoolConnectionProxy[Record]


def _plan(row: Record) -> Plan:
    return Plan(
        row["id"], row["name"], row["monthly_price"], row["monthly_allowance"], row["created_at"]
    )


def _subscription(row: Record) -> Subscription:
    return Subscription(
        row["id"],
        row["account_id"],
        row["plan_id"],
        SubscriptionStatus(row["status"]),
        row["started_at"],
        row["periods_granted"],
    )


class PostgresSubscriptionStore:
    def __init__(self, pool: asyncpg.Pool[Record], ledger: PostgresLedgerStore) -> None:
        self._pool = pool
        self._ledger = ledger

    async def insert_plan(self, name: str, price: int, allowance: int) -> Plan:
        row = await self._pool.fetchrow(
            """INSERT INTO plans (id, name, monthly_price, monthly_allowance)
               VALUES ($1, $2, $3, $4) RETURNING *""",
            uuid4(),
            name,
            price,
            allowance,
        )
        assert row is not None
        return _plan(row)

    async def list_plans(self) -> list[Plan]:
        return [_plan(r) for r in await self._pool.fetch("SELECT * FROM plans ORDER BY created_at")]

    async def subscribe(self, account_id: UUID, plan_id: UUID, now: datetime) -> Subscription:
        async with self._pool.acquire() as conn, conn.transaction():
            plan = await conn.fetchrow("SELECT * FROM plans WHERE id = $1", plan_id)
            if plan is None:
                raise NotFound(f"Plan {plan_id} not found")
            try:
                row = await conn.fetchrow(
                    """INSERT INTO subscriptions (id, account_id, plan_id, status, started_at)
                       VALUES ($1, $2, $3, 'active', $4) RETURNING *""",
                    uuid4(),
                    account_id,
                    plan_id,
                    now,
                )
            except asyncpg.UniqueViolationError:
                raise FailedPrecondition("The account already has an active subscription") from None
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(f"Account {account_id} not found") from None
            assert row is not None
            return await self._grant_due(conn, _subscription(row), plan["monthly_allowance"], now)

    async def active(self, account_id: UUID) -> Subscription | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM subscriptions WHERE account_id = $1 AND status = 'active'", account_id
        )
        return None if row is None else _subscription(row)

    async def get(self, subscription_id: UUID) -> Subscription | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM subscriptions WHERE id = $1", subscription_id
        )
        return None if row is None else _subscription(row)

    async def cancel(self, subscription_id: UUID) -> Subscription | None:
        row = await self._pool.fetchrow(
            """UPDATE subscriptions SET status = 'cancelled',
                                        cancelled_at = coalesce(cancelled_at, now())
               WHERE id = $1 RETURNING *""",
            subscription_id,
        )
        return None if row is None else _subscription(row)

    async def renew_due(self, now: datetime) -> int:
        """Grants the current period's allowance of every active subscription lacking it."""
        candidates = await self._pool.fetch(
            "SELECT id FROM subscriptions WHERE status = 'active' ORDER BY id"
        )
        granted = 0
        for candidate in candidates:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """SELECT s.*, p.monthly_allowance FROM subscriptions s
                       JOIN plans p ON p.id = s.plan_id
                       WHERE s.id = $1 AND s.status = 'active' FOR UPDATE OF s""",
                    candidate["id"],
                )
                if row is None:
                    continue
                before = _subscription(row)
                after = await self._grant_due(conn, before, row["monthly_allowance"], now)
                granted += after.periods_granted != before.periods_granted
        return granted

    async def _grant_due(
        self, conn: Connection, subscription: Subscription, allowance: int, now: datetime
    ) -> Subscription:
        period = period_index(subscription.started_at, now)
        if period < subscription.periods_granted:
            return subscription
        if allowance:
            await self._ledger.post_allowance(
                conn,
                subscription.account_id,
                allowance,
                f"subscription:{subscription.subscription_id}:{period}",
            )
        row = await conn.fetchrow(
            "UPDATE subscriptions SET periods_granted = $2 WHERE id = $1 RETURNING *",
            subscription.subscription_id,
            period + 1,
        )
        assert row is not None
        return _subscription(row)
