"""PostgreSQL adapter for node standings (state_ports.StandingStore)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from server.network.state_ports import StandingRecord


class PostgresStandingStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], network_id: str) -> None:
        self._pool = pool
        self._network_id = network_id

    async def load_standing(self, node_id: str) -> StandingRecord | None:
        row = await self._pool.fetchrow(
            """SELECT node_id, operator_account_id, reputation, failed_canary, quarantine_reason
               FROM network_node_standings WHERE network_id = $1 AND node_id = $2""",
            self._network_id,
            node_id,
        )
        return None if row is None else StandingRecord(*row.values())

    async def save_standings(self, records: Sequence[StandingRecord]) -> None:
        await self._pool.executemany(
            """INSERT INTO network_node_standings AS s (network_id, node_id,
                   operator_account_id, reputation, failed_canary, quarantine_reason)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (network_id, node_id) DO UPDATE SET
                   operator_account_id = excluded.operator_account_id,
                   reputation = excluded.reputation,
                   failed_canary = excluded.failed_canary,
                   quarantine_reason = excluded.quarantine_reason,
                   updated_at = now()""",
            [
                (
                    self._network_id,
                    r.node_id,
                    r.operator_account_id,
                    r.reputation,
                    r.failed_canary,
                    r.quarantine_reason,
                )
                for r in records
            ],
        )
