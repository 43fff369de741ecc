"""PostgreSQL adapter of the ledger outbox: batches of unpublished events, marked
published in the transaction that locked them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from server.account.ledger_events import LedgerEvent
from server.account.ledger_sql import Record


class PostgresOutboxStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def relay_batch(
        self, limit: int, publish: Callable[[Sequence[LedgerEvent]], Awaitable[None]]
    ) -> int:
        """Publishes up to ``limit`` unpublished events, oldest first, and marks them
        published; returns how many. A failed publish leaves them unpublished.

        The rows stay locked while they are published; SKIP LOCKED lets relays of
        several replicas take different batches side by side.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT id, kind, payload, created_at FROM ledger_outbox
                   WHERE published_at IS NULL ORDER BY seq LIMIT $1
                   FOR UPDATE SKIP LOCKED""",
                limit,
            )
            if not rows:
                return 0
            await publish(
                [
                    LedgerEvent(
                        row["id"], row["kind"], json.loads(row["payload"]), row["created_at"]
                    )
                    for row in rows
                ]
            )
            await conn.execute(
                "UPDATE ledger_outbox SET published_at = now() WHERE id = ANY($1::uuid[])",
                [row["id"] for row in rows],
            )
        return len(rows)
