"""PostgreSQL adapter of the consumer usage projection."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from server.account.ledger import HoldStatus
from server.account.ledger_sql import Record
from server.account.usage import Interval, UsageBucket, UsageRecord


class PostgresUsageStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def add(self, record: UsageRecord) -> bool:
        # One statement: the record and its hour's sums change together, or neither.
        counted = await self._pool.fetchval(
            """WITH recorded AS (
                   INSERT INTO usage_records
                       (hold_id, account_id, status, held, charged, tokens, settled_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (hold_id) DO NOTHING RETURNING hold_id
               ), counted AS (
                   INSERT INTO usage_hourly (account_id, hour, requests, tokens, charged)
                   SELECT $2, date_trunc('hour', $7::timestamptz, 'UTC'), 1, $6, $5
                   FROM recorded
                   ON CONFLICT (account_id, hour) DO UPDATE
                   SET requests = usage_hourly.requests + 1,
                       tokens = usage_hourly.tokens + excluded.tokens,
                       charged = usage_hourly.charged + excluded.charged
                   RETURNING 1
               )
               SELECT EXISTS (SELECT FROM counted)""",
            record.hold_id,
            record.account_id,
            record.status.value,
            record.held,
            record.charged,
            record.tokens,
            record.settled_at,
        )
        return bool(counted)

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
