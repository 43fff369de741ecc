"""PostgreSQL adapter of the operator earnings projection."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from server.account.ledger import ContributionTotal
from server.account.ledger_sql import Record


class PostgresEarningsStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def add_contribution(
        self, event_id: UUID, operator_id: UUID, epoch: int, tokens: int, amount: int
    ) -> bool:
        # One statement: the event is marked seen and counted together, or neither.
        counted = await self._pool.fetchval(
            """WITH seen AS (
                   INSERT INTO projected_events (event_id) VALUES ($1)
                   ON CONFLICT DO NOTHING RETURNING event_id
               ), counted AS (
                   INSERT INTO operator_earnings (operator_account_id, epoch, jobs, tokens, amount)
                   SELECT $2, $3, 1, $4, $5 FROM seen
                   ON CONFLICT (operator_account_id, epoch) DO UPDATE
                   SET jobs = operator_earnings.jobs + 1,
                       tokens = operator_earnings.tokens + excluded.tokens,
                       amount = operator_earnings.amount + excluded.amount
                   RETURNING 1
               )
               SELECT EXISTS (SELECT FROM counted)""",
            event_id,
            operator_id,
            epoch,
            tokens,
            amount,
        )
        return bool(counted)

    async def earnings(self, operator_id: UUID, epochs: int) -> list[ContributionTotal]:
        rows = await self._pool.fetch(
            """SELECT epoch, jobs, tokens, amount FROM operator_earnings
               WHERE operator_account_id = $1 ORDER BY epoch DESC LIMIT $2""",
            operator_id,
            epochs,
        )
        return [ContributionTotal(r["epoch"], r["jobs"], r["tokens"], r["amount"]) for r in rows]
