"""PostgreSQL adapter of subscriptions: plans, paid periods, allowance grants and expiry.

Charges, grants and expiries are ledger transfers (ledger_sql.post) made in
the transaction that records the period, under the subscription's or the
period's row lock, with idempotency keys naming the subscription and period.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from core.errors import FailedPrecondition, InsufficientQuota, NotFound
from server.account.ledger import TransferKind
from server.account.ledger_sql import (
    AVAILABLE,
    CASH_IN,
    PLATFORM_REVENUE,
    Connection,
    Record,
    ledger_account_id,
    post,
)
from server.account.subscriptions import (
    Plan,
    Subscription,
    SubscriptionStatus,
    add_months,
    period_index,
    unused_allowance,
)


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
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

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
        """Creates the subscription and pays and grants its first period, or nothing."""
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
            # Insufficient funds raise here and roll the subscription back.
            return await _start_period(conn, _subscription(row), plan, 0)

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

    async def list_subscriptions(
        self, account_id: UUID | None, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Subscription]:
        rows = await self._pool.fetch(
            """SELECT * FROM subscriptions
               WHERE ($1::uuid IS NULL OR account_id = $1)
                 AND ($2::timestamptz IS NULL OR (started_at, id) < ($2, $3))
               ORDER BY started_at DESC, id DESC LIMIT $4""",
            account_id,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_subscription(row) for row in rows]

    async def cancel(self, subscription_id: UUID) -> Subscription | None:
        """Cancels an active subscription; a lapsed or cancelled one is returned as it is."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE subscriptions SET status = 'cancelled', cancelled_at = now()
                   WHERE id = $1 AND status = 'active' RETURNING *""",
                subscription_id,
            )
            if row is None:
                row = await conn.fetchrow(
                    "SELECT * FROM subscriptions WHERE id = $1", subscription_id
                )
        return None if row is None else _subscription(row)

    async def expire_ended_periods(self, now: datetime) -> tuple[int, int]:
        """Takes back the unused allowance of every period that ended by ``now``."""
        candidates = await self._pool.fetch(
            """SELECT subscription_id, period FROM subscription_periods
               WHERE expired_at IS NULL AND ends_at <= $1 ORDER BY ends_at""",
            now,
        )
        expired = returned = 0
        for candidate in candidates:
            async with self._pool.acquire() as conn, conn.transaction():
                amount = await _expire_period(
                    conn, candidate["subscription_id"], candidate["period"]
                )
            if amount is not None:
                expired += 1
                returned += amount
        return expired, returned

    async def renew_due(self, now: datetime) -> tuple[int, int]:
        """Pays and grants the current period of every active subscription lacking it."""
        candidates = await self._pool.fetch(
            "SELECT id FROM subscriptions WHERE status = 'active' ORDER BY id"
        )
        granted = lapsed = 0
        for candidate in candidates:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """SELECT s.*, p.monthly_price, p.monthly_allowance FROM subscriptions s
                       JOIN plans p ON p.id = s.plan_id
                       WHERE s.id = $1 AND s.status = 'active' FOR UPDATE OF s""",
                    candidate["id"],
                )
                if row is None:
                    continue
                subscription = _subscription(row)
                period = period_index(subscription.started_at, now)
                if period < subscription.periods_granted:
                    continue
                try:
                    # A savepoint: a failed charge leaves the transaction usable.
                    async with conn.transaction():
                        await _start_period(conn, subscription, row, period)
                    granted += 1
                except InsufficientQuota:
                    await conn.execute(
                        """UPDATE subscriptions SET status = 'lapsed', lapsed_at = $2
                           WHERE id = $1""",
                        subscription.subscription_id,
                        now,
                    )
                    lapsed += 1
        return granted, lapsed


async def _start_period(
    conn: Connection, subscription: Subscription, plan: Record, period: int
) -> Subscription:
    """Charges the period's price, grants its allowance and records the period.

    Raises InsufficientQuota when the subscriber's available credits do not
    cover the price.
    """
    sub_id = subscription.subscription_id
    consumer = await ledger_account_id(conn, subscription.account_id, "consumer")
    price, allowance = plan["monthly_price"], plan["monthly_allowance"]
    charge = grant = None
    if price:
        charge = await post(
            conn,
            consumer,
            PLATFORM_REVENUE.any_shard(),
            price,
            TransferKind.SUBSCRIPTION_CHARGE,
            f"subscription:{sub_id}:{period}:charge",
            f"subscription-charge:{sub_id}:{period}:{price}",
        )
    if allowance:
        grant = await post(
            conn,
            CASH_IN.any_shard(),
            consumer,
            allowance,
            TransferKind.SUBSCRIPTION_ALLOWANCE,
            f"subscription:{sub_id}:{period}",
            f"allowance:{subscription.account_id}:{allowance}",
        )
    await conn.execute(
        """INSERT INTO subscription_periods (subscription_id, period, starts_at, ends_at, price,
                                             allowance, charge_transfer_id, grant_transfer_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
        sub_id,
        period,
        add_months(subscription.started_at, period),
        add_months(subscription.started_at, period + 1),
        price,
        allowance,
        charge,
        grant,
    )
    row = await conn.fetchrow(
        "UPDATE subscriptions SET periods_granted = $2 WHERE id = $1 RETURNING *",
        sub_id,
        period + 1,
    )
    assert row is not None
    return _subscription(row)


async def _expire_period(conn: Connection, subscription_id: UUID, period: int) -> int | None:
    """Returns the period's unused allowance to cash-in; None if already expired."""
    row = await conn.fetchrow(
        """SELECT p.*, s.account_id FROM subscription_periods p
           JOIN subscriptions s ON s.id = p.subscription_id
           WHERE p.subscription_id = $1 AND p.period = $2 AND p.expired_at IS NULL
           FOR UPDATE OF p""",
        subscription_id,
        period,
    )
    if row is None:
        return None
    consumer = await ledger_account_id(conn, row["account_id"], "consumer")
    # The consumer's row lock keeps spend and balance still until the transfer.
    available = await conn.fetchval(
        f"SELECT {AVAILABLE} FROM ledger_accounts WHERE id = $1 FOR UPDATE", consumer
    )
    spent = await conn.fetchval(
        """SELECT coalesce(sum(amount), 0) FROM transfers
           WHERE kind = 'capture' AND debit_account_id = $1
             AND created_at >= $2 AND created_at < $3""",
        consumer,
        row["starts_at"],
        row["ends_at"],
    )
    unused = unused_allowance(row["allowance"], int(spent), int(available))
    if unused:
        await post(
            conn,
            consumer,
            CASH_IN.any_shard(),
            unused,
            TransferKind.ALLOWANCE_EXPIRY,
            f"subscription:{subscription_id}:{period}:expiry",
            f"allowance-expiry:{subscription_id}:{period}:{unused}",
        )
    await conn.execute(
        """UPDATE subscription_periods SET expired_at = now(), returned = $3
           WHERE subscription_id = $1 AND period = $2""",
        subscription_id,
        period,
        unused,
    )
    return unused
