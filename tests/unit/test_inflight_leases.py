"""A settled request's row is deleted by the next request's insert (one write per
request), or on its own when no request follows soon; either way before its
close returns, and a failed insert does not keep it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from core.inference import ModelPrice
from server.cloud.inflight import InFlightLeases, InFlightRequest
from server.cloud.ports import HoldRef
from tests.doubles.cloud_ports import InMemoryInFlight


class _CountingStore(InMemoryInFlight):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, ...]] = []
        self.failing = False

    async def add(
        self,
        request: InFlightRequest,
        replica_id: str,
        lease_s: float,
        forget: Sequence[str] = (),
    ) -> None:
        self.writes.append(("add", request.hold.hold_id, *forget))
        if self.failing:
            raise ConnectionError("the database is down")
        await super().add(request, replica_id, lease_s, forget)

    async def remove(self, hold_id: str) -> None:
        self.writes.append(("remove", hold_id))
        await super().remove(hold_id)


def _request(hold_id: str) -> InFlightRequest:
    return InFlightRequest(HoldRef(hold_id, 100), f"req-{hold_id}", ("j",), "m", ModelPrice(1, 1))


async def test_the_next_request_deletes_the_settled_ones_in_its_own_write() -> None:
    store = _CountingStore()
    leases = InFlightLeases(store, lease_s=60, forget_within_s=60)
    leases.open(_request("a"))
    leases.open(_request("b"))
    closing = [asyncio.create_task(leases.close(hold_id)) for hold_id in ("a", "b")]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not any(task.done() for task in closing)
    leases.open(_request("c"))
    await asyncio.wait_for(asyncio.gather(*closing), timeout=5)
    assert store.writes == [("add", "a"), ("add", "b"), ("add", "c", "a", "b")]
    assert set(store.requests) == {"c"}


async def test_with_no_request_following_the_row_is_deleted_on_its_own() -> None:
    store = _CountingStore()
    leases = InFlightLeases(store, lease_s=60, forget_within_s=0.01)
    leases.open(_request("a"))
    await asyncio.wait_for(leases.close("a"), timeout=5)
    assert store.writes == [("add", "a"), ("remove", "a")]
    assert store.requests == {}


async def test_a_failed_insert_still_deletes_the_settled_rows_it_carried() -> None:
    store = _CountingStore()
    leases = InFlightLeases(store, lease_s=60, forget_within_s=60)
    leases.open(_request("a"))
    closing = asyncio.create_task(leases.close("a"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    store.failing = True
    leases.open(_request("b"))
    await asyncio.wait_for(closing, timeout=5)
    assert store.requests == {}
    # The request whose record failed has nothing to delete.
    await asyncio.wait_for(leases.close("b"), timeout=5)
    assert store.writes == [("add", "a"), ("add", "b", "a"), ("remove", "a")]


@pytest.mark.parametrize("closes", [1, 3])
async def test_closing_waits_for_the_record_to_be_written_first(closes: int) -> None:
    store = _CountingStore()
    leases = InFlightLeases(store, lease_s=60, forget_within_s=0.01)
    for index in range(closes):
        leases.open(_request(str(index)))
    await asyncio.wait_for(
        asyncio.gather(*(leases.close(str(index)) for index in range(closes))), timeout=5
    )
    assert store.requests == {}
