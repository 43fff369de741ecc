"""PostgreSQL adapter of the consumer usage projection.

Records that arrive together are stored together (group commit,
server/common/batcher.py): one statement for a batch, not a transaction each.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from server.account.ledger import HoldStatus
from server.account.ledger_sql import Record
from server.account.usage import Interval, UsageBucket, UsageRecord
from server.common.batcher import Batcher


class PostgresUsageStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool
        self._records = Batcher(self._add_one, self._add_many, key=lambda r: r.hold_id)

    async def add(self, record: UsageRecord) -> bool:
        return await self._records.submit(record)

    async def _add_one(self, record: UsageRecord) -> bool:
        (counted,) = await self._add_many([record])
        return counted

    async def _add_many(self, records: Sequence[UsageRecord]) -> list[bool]:
        """Whether each record (distinct holds) counted now; a hold recorded before does not.

        One statement: the records and their hours' sums change together, or neither.
        The hours are locked in (account, hour) order, so batches never deadlock.
        """
        rows = await self._pool.fetch(
            """WITH recorded AS (
                   INSERT INTO usage_records
                       (hold_id, account_id, status, held, charged, tokens, settled_at)
                   SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[],
                                        $5::bigint[], $6::bigint[], $7::timestamptz[])
                   ON CONFLICT (hold_id) DO NOTHING
                   RETURNING hold_id, account_id, charged, tokens, settled_at
               ), counted AS (
                   INSERT INTO usage_hourly (account_id, hour, requests, tokens, charged)
                   SELECT account_id, date_trunc('hour', settled_at, 'UTC'), count(*),
                          sum(tokens), sum(charged)
                   FROM recorded GROUP BY 1, 2 ORDER BY 1, 2
                   ON CONFLICT (account_id, hour) DO UPDATE
                   SET requests = usage_hourly.requests + excluded.requests,
                       tokens = usage_hourly.tokens + excluded.tokens,
                       charged = usage_hourly.charged + excluded.charged
               )
               SELECT hold_id FROM recorded""",
            [r.hold_id for r in records],
            [r.account_id for r in records],
            [r.status.value for r in records],
            [r.held for r in records],
            [r.charged for r in records],
            [r.tokens for r in records],
            [r.settled_at for r in records],
        )
        counted = {row["hold_id"] for row in rows}
        return [r.hold_id in counted for r in records]

    async def records(
        self, account_id: UUID, limit: int, before: tuple[datetime, UUID] | None
    ) -> list[UsageRecord]:
        rows = await self._pool.fetch(
            """SELECT * FROM usage_records
               WHERE account_id = $1
                 AND ($2::timestamptz IS NULL OR (settled_at, hold_id) < ($2, $3))
               ORDER BY settled_at DESC, hold_id DESC LIMIT $4""",
            account_id,
            before[0] if before else None,
            before[1] if before else None,
            limit,
        )
        return [
            UsageRecord(
                hold_id=row["hold_id"],
                account_id=row["account_id"],
                status=HoldStatus(row["status"]),
                held=row["held"],
                charged=row["charged"],
                tokens=row["tokens"],
                settled_at=row["settled_at"],
            )
            for row in rows
        ]

    async def totals(
        self, account_id: UUID, interval: Interval, since: datetime
    ) -> list[UsageBucket]:
        rows = await self._pool.fetch(
            """SELECT date_trunc($2, hour, 'UTC') AS start, sum(requests) AS requests,
                      sum(tokens) AS tokens, sum(charged) AS charged
               FROM usage_hourly WHERE account_id = $1 AND hour >= $3
               GROUP BY 1 ORDER BY 1""",
            account_id,
            interval.value,
            since,
        )
        # sum() over bigint is numeric in PostgreSQL: convert to int.
        return [
            UsageBucket(row["start"], int(row["requests"]), int(row["tokens"]), int(row["charged"]))
            for row in rows
        ]
