"""PostgreSQL adapter of the operator earnings projection.

Contribution events that arrive together are counted together (group commit,
server/common/batcher.py): one statement marks a batch of events seen and adds
them to their operators' epochs, instead of one transaction per event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from server.account.ledger import ContributionTotal
from server.account.ledger_sql import Record
from server.common.batcher import Batcher


@dataclass(frozen=True)
class _Contribution:
    event_id: UUID
    operator_id: UUID
    epoch: int
    tokens: int
    amount: int


class PostgresEarningsStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool
        self._contributions = Batcher(self._add_one, self._add_many, key=lambda c: c.event_id)

    async def add_contribution(
        self, event_id: UUID, operator_id: UUID, epoch: int, tokens: int, amount: int
    ) -> bool:
        contribution = _Contribution(event_id, operator_id, epoch, tokens, amount)
        return await self._contributions.submit(contribution)

    async def _add_one(self, contribution: _Contribution) -> bool:
        (counted,) = await self._add_many([contribution])
        return counted

    async def _add_many(self, contributions: Sequence[_Contribution]) -> list[bool]:
        """Whether each event (distinct ids) counted now; an event seen before does not.

        One statement: the events are marked seen and counted together, or neither.
        The totals are locked in (operator, epoch) order, so batches never deadlock.
        """
        rows = await self._pool.fetch(
            """WITH event AS (
                   SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[],
                                        $5::bigint[]) AS e(id, operator, epoch, tokens, amount)
               ), seen AS (
                   INSERT INTO projected_events (event_id) SELECT id FROM event
                   ON CONFLICT DO NOTHING RETURNING event_id
               ), counted AS (
                   INSERT INTO operator_earnings (operator_account_id, epoch, jobs, tokens, amount)
                   SELECT e.operator, e.epoch, count(*), sum(e.tokens), sum(e.amount)
                   FROM event e JOIN seen ON seen.event_id = e.id
                   GROUP BY e.operator, e.epoch ORDER BY e.operator, e.epoch
                   ON CONFLICT (operator_account_id, epoch) DO UPDATE
                   SET jobs = operator_earnings.jobs + excluded.jobs,
                       tokens = operator_earnings.tokens + excluded.tokens,
                       amount = operator_earnings.amount + excluded.amount
               )
               SELECT event_id FROM seen""",
            [c.event_id for c in contributions],
            [c.operator_id for c in contributions],
            [c.epoch for c in contributions],
            [c.tokens for c in contributions],
            [c.amount for c in contributions],
        )
        counted = {row["event_id"] for row in rows}
        return [c.event_id in counted for c in contributions]

    async def earnings(self, operator_id: UUID, epochs: int) -> list[ContributionTotal]:
        rows = await self._pool.fetch(
            """SELECT epoch, jobs, tokens, amount FROM operator_earnings
               WHERE operator_account_id = $1 ORDER BY epoch DESC LIMIT $2""",
            operator_id,
            epochs,
        )
        return [ContributionTotal(r["epoch"], r["jobs"], r["tokens"], r["amount"]) for r in rows]
