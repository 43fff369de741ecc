"""PostgreSQL adapter for requests in flight (inflight.InFlightStore).

Leases are timed by the database's clock, the one every replica shares. Requests
admitted together are recorded together (group commit, server/common/batcher.py):
one statement inserts them all and deletes every settled row they carry; a lone
request is one statement of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from core.inference import ModelPrice
from server.cloud.inflight import InFlightRequest, Orphan
from server.cloud.ports import HoldRef
from server.common.batcher import Batcher


@dataclass(frozen=True, slots=True)
class _Add:
    request: InFlightRequest
    replica_id: str
    lease_s: float
    forget: tuple[str, ...]


class PostgresInFlightStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool
        # The outcome is True once written (a batcher's outcomes are never None).
        self._adds: Batcher[_Add, bool] = Batcher(
            self._add_one, self._add_many, key=lambda add: add.request.hold.hold_id
        )

    async def add(
        self,
        request: InFlightRequest,
        replica_id: str,
        lease_s: float,
        forget: Sequence[str] = (),
    ) -> None:
        await self._adds.submit(_Add(request, replica_id, lease_s, tuple(forget)))

    async def _add_one(self, add: _Add) -> bool:
        (written,) = await self._add_many([add])
        return written

    async def _add_many(self, adds: Sequence[_Add]) -> list[bool]:
        """Inserts the requests (distinct holds) and deletes the rows they forget, in one
        statement: all of it is written, or none (a duplicate hold fails them all)."""
        # Each request's job ids are the slice [first, last] of one flat array.
        job_ids: list[str] = []
        firsts: list[int] = []
        lasts: list[int] = []
        for add in adds:
            firsts.append(len(job_ids) + 1)
            job_ids.extend(add.request.job_ids)
            lasts.append(len(job_ids))
        await self._pool.execute(
            """WITH forgotten AS (
                   DELETE FROM cloud_inflight_requests WHERE hold_id = ANY($1::text[]))
               INSERT INTO cloud_inflight_requests (hold_id, hold_amount, request_id, job_ids,
                   model, prompt_price, completion_price, replica_id, lease_expires)
               SELECT r.hold_id, r.hold_amount, r.request_id, ($2::text[])[r.first:r.last],
                      r.model, r.prompt_price, r.completion_price, r.replica_id,
                      now() + make_interval(secs => r.lease_s)
               FROM unnest($3::text[], $4::bigint[], $5::text[], $6::int[], $7::int[],
                           $8::text[], $9::bigint[], $10::bigint[], $11::text[],
                           $12::float8[])
                   AS r(hold_id, hold_amount, request_id, first, last, model, prompt_price,
                        completion_price, replica_id, lease_s)""",
            [hold_id for add in adds for hold_id in add.forget],
            job_ids,
            [add.request.hold.hold_id for add in adds],
            [add.request.hold.amount for add in adds],
            [add.request.request_id for add in adds],
            firsts,
            lasts,
            [add.request.model for add in adds],
            [add.request.price.prompt for add in adds],
            [add.request.price.completion for add in adds],
            [add.replica_id for add in adds],
            [add.lease_s for add in adds],
        )
        return [True] * len(adds)

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
