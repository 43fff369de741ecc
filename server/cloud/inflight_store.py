"""PostgreSQL adapter for requests in flight (inflight.InFlightStore).

Leases are timed by the database's clock, the one every replica shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from core.inference import ModelPrice
from server.cloud.inflight import InFlightRequest, Orphan
from server.cloud.ports import HoldRef


class PostgresInFlightStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    async def add(
        self,
        request: InFlightRequest,
        replica_id: str,
        lease_s: float,
        forget: Sequence[str] = (),
    ) -> None:
        await self._pool.execute(
            """WITH forgotten AS (
                   DELETE FROM cloud_inflight_requests WHERE hold_id = ANY($10::text[]))
               INSERT INTO cloud_inflight_requests (hold_id, hold_amount, request_id, job_ids,
                   model, prompt_price, completion_price, replica_id, lease_expires)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))""",
            request.hold.hold_id,
            request.hold.amount,
            request.request_id,
            list(request.job_ids),
            request.model,
            request.price.prompt,
            request.price.completion,
            replica_id,
            lease_s,
            list(forget),
        )

    async def remove(self, hold_id: str) -> None:
        await self._pool.execute("DELETE FROM cloud_inflight_requests WHERE hold_id = $1", hold_id)

    async def renew(self, hold_ids: Sequence[str], lease_s: float) -> None:
        await self._pool.execute(
            """UPDATE cloud_inflight_requests
               SET lease_expires = now() + make_interval(secs => $2)
               WHERE hold_id = ANY($1::text[])""",
            list(hold_ids),
            lease_s,
        )

    async def claim_lapsed(self, limit: int, claim_s: float) -> list[Orphan]:
        rows = await self._pool.fetch(
            """UPDATE cloud_inflight_requests AS r
               SET lease_expires = now() + make_interval(secs => $2),
                   orphaned_at = coalesce(r.orphaned_at, now())
               FROM (SELECT hold_id FROM cloud_inflight_requests
                     WHERE lease_expires < now()
                     ORDER BY lease_expires LIMIT $1
                     FOR UPDATE SKIP LOCKED) AS lapsed
               WHERE r.hold_id = lapsed.hold_id
               RETURNING r.*, extract(epoch FROM now() - r.orphaned_at) AS orphaned_for_s""",
            limit,
            claim_s,
        )
        return [
            Orphan(
                InFlightRequest(
                    HoldRef(row["hold_id"], row["hold_amount"]),
                    row["request_id"],
                    tuple(row["job_ids"]),
                    row["model"],
                    ModelPrice(row["prompt_price"], row["completion_price"]),
                ),
                float(row["orphaned_for_s"]),
            )
            for row in rows
        ]
