"""The PostgreSQL store of requests in flight: a request's insert also deletes the
rows of the settled requests it carries, in the same statement; requests recorded
together share one statement, and a failure is its own request's only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from core.inference import ModelPrice
from server.cloud.component import MIGRATIONS
from server.cloud.inflight import InFlightRequest
from server.cloud.inflight_store import PostgresInFlightStore
from server.cloud.ports import HoldRef
from server.common.database import apply_migrations, create_pool, load_migrations


def _request(hold_id: str, job_ids: tuple[str, ...] = ("j",)) -> InFlightRequest:
    return InFlightRequest(HoldRef(hold_id, 100), f"req-{hold_id}", job_ids, "m", ModelPrice(1, 1))


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    pool = await create_pool(postgres_dsn)
    try:
        await apply_migrations(pool, load_migrations("cloud", MIGRATIONS))
        yield pool
    finally:
        await pool.close()


async def _rows(pool: asyncpg.Pool[asyncpg.Record], holds: list[str]) -> list[asyncpg.Record]:
    """The holds' rows and the transaction that wrote each (rows of one statement
    share it)."""
    return await pool.fetch(
        """SELECT hold_id, job_ids, request_id, hold_amount, replica_id, xmin::text AS xact,
                  lease_expires > now() + interval '50 seconds' AS leased
           FROM cloud_inflight_requests WHERE hold_id = ANY($1::text[]) ORDER BY hold_id""",
        holds,
    )


async def test_an_insert_deletes_the_settled_rows_it_carries(
    pool: asyncpg.Pool[asyncpg.Record],
) -> None:
    store = PostgresInFlightStore(pool)
    holds = ["inflight-store-a", "inflight-store-b", "inflight-store-c"]
    await store.add(_request(holds[0]), "replica", 60)
    await store.add(_request(holds[1]), "replica", 60)
    await store.add(_request(holds[2]), "replica", 60, forget=holds[:2])
    rows = await _rows(pool, holds)
    assert [row["hold_id"] for row in rows] == [holds[2]]
    await store.remove(holds[2])
    assert await _rows(pool, holds) == []


async def test_requests_recorded_together_share_one_statement(
    pool: asyncpg.Pool[asyncpg.Record],
) -> None:
    store = PostgresInFlightStore(pool)
    settled = ["together-settled-a", "together-settled-b"]
    for hold_id in settled:
        await store.add(_request(hold_id), "replica", 60)
    jobs = {"together-1": ("j1",), "together-2": ("j2a", "j2b", "j2c"), "together-3": ()}
    await asyncio.gather(
        store.add(_request("together-1", jobs["together-1"]), "replica", 60),
        store.add(_request("together-2", jobs["together-2"]), "replica", 60, forget=settled),
        store.add(_request("together-3", jobs["together-3"]), "other", 60),
    )
    rows = await _rows(pool, [*settled, *jobs])
    assert [row["hold_id"] for row in rows] == list(jobs)
    assert len({row["xact"] for row in rows}) == 1
    for row in rows:
        assert tuple(row["job_ids"]) == jobs[row["hold_id"]]
        assert row["request_id"] == f"req-{row['hold_id']}"
        assert row["hold_amount"] == 100
        assert row["leased"]
    assert [row["replica_id"] for row in rows] == ["replica", "replica", "other"]


async def test_a_failed_request_fails_alone_and_the_others_are_written(
    pool: asyncpg.Pool[asyncpg.Record],
) -> None:
    store = PostgresInFlightStore(pool)
    await store.add(_request("alone-taken"), "replica", 60)
    await store.add(_request("alone-settled"), "replica", 60)
    outcomes = await asyncio.gather(
        store.add(_request("alone-1"), "replica", 60, forget=["alone-settled"]),
        store.add(_request("alone-taken"), "replica", 60),  # a duplicate hold
        store.add(_request("alone-2"), "replica", 60),
        return_exceptions=True,
    )
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], asyncpg.UniqueViolationError)
    rows = await _rows(pool, ["alone-1", "alone-2", "alone-settled", "alone-taken"])
    assert [row["hold_id"] for row in rows] == ["alone-1", "alone-2", "alone-taken"]
    # Written after the batch failed, each in its own statement.
    assert len({row["xact"] for row in rows}) == 3
