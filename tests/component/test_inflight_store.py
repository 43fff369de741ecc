"""The PostgreSQL store of requests in flight: a request's insert also deletes the
rows of the settled requests it carries, in the same statement."""

from __future__ import annotations

from core.inference import ModelPrice
from server.cloud.component import MIGRATIONS
from server.cloud.inflight import InFlightRequest
from server.cloud.inflight_store import PostgresInFlightStore
from server.cloud.ports import HoldRef
from server.common.database import apply_migrations, create_pool, load_migrations


def _request(hold_id: str) -> InFlightRequest:
    return InFlightRequest(HoldRef(hold_id, 100), f"req-{hold_id}", ("j",), "m", ModelPrice(1, 1))


async def test_an_insert_deletes_the_settled_rows_it_carries(postgres_dsn: str) -> None:
    pool = await create_pool(postgres_dsn)
    try:
        await apply_migrations(pool, load_migrations("cloud", MIGRATIONS))
        store = PostgresInFlightStore(pool)
        holds = ["inflight-store-a", "inflight-store-b", "inflight-store-c"]
        await store.add(_request(holds[0]), "replica", 60)
        await store.add(_request(holds[1]), "replica", 60)
        await store.add(_request(holds[2]), "replica", 60, forget=holds[:2])
        rows = await pool.fetch(
            "SELECT hold_id FROM cloud_inflight_requests WHERE hold_id = ANY($1::text[])", holds
        )
        assert [row["hold_id"] for row in rows] == [holds[2]]
        await store.remove(holds[2])
        assert not await pool.fetchval(
            "SELECT count(*) FROM cloud_inflight_requests WHERE hold_id = ANY($1::text[])", holds
        )
    finally:
        await pool.close()
