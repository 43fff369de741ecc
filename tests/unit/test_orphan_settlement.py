"""Settling a dead replica's request from the network's job records."""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import HoldAlreadyResolved
from core.inference import ModelPrice, Usage
from server.cloud.inflight import InFlightRequest, Orphan
from server.cloud.orphans import OrphanSweeper, orphan_settlement
from server.cloud.ports import HoldRef, OperatorLine, RelayedJob
from server.common.settlements import Settlement

PRICE = ModelPrice(prompt=1, completion=2)


def _request(hold: int = 10_000, jobs: int = 2) -> InFlightRequest:
    return InFlightRequest(
        HoldRef("h", hold), "req", tuple(f"j{i}" for i in range(jobs)), "m", PRICE
    )


def test_no_record_captures_nothing() -> None:
    settlement = orphan_settlement(_request(), [])
    assert (settlement.hold_id, settlement.capture) == ("h", 0)
    assert settlement.shares.lines == ()
    assert settlement.idempotency_key == "settle:h"


def test_relayed_tokens_are_charged_and_credited_to_the_nodes_operators() -> None:
    jobs = [
        RelayedJob("j0", Usage(4, 10), (("n1", "op1"),), ended=True),
        # Moved from n1 to n2: the record does not split it, the last node is credited.
        RelayedJob("j1", Usage(4, 6), (("n1", "op1"), ("n2", "op2")), ended=True),
    ]
    settlement = orphan_settlement(_request(), jobs)
    assert settlement.capture == 8 * 1 + 16 * 2
    assert settlement.shares.total_tokens == 24
    assert settlement.shares.lines == (
        OperatorLine("op1", "n1", "m", 14),
        OperatorLine("op2", "n2", "m", 10),
    )


def test_a_node_without_operator_earns_the_platform() -> None:
    jobs = [RelayedJob("j0", Usage(4, 10), (("n1", ""),), ended=True)]
    settlement = orphan_settlement(_request(jobs=1), jobs)
    assert (settlement.capture, settlement.shares.lines) == (24, ())
    assert settlement.shares.total_tokens == 14


def test_the_capture_never_exceeds_the_hold() -> None:
    jobs = [RelayedJob("j0", Usage(4, 10), (("n1", "op1"),), ended=True)]
    assert orphan_settlement(_request(hold=20, jobs=1), jobs).capture == 20


class _Store:
    def __init__(self, orphans: list[Orphan]) -> None:
        self.orphans = orphans
        self.removed: list[str] = []

    async def claim_lapsed(self, limit: int, claim_s: float) -> list[Orphan]:
        return self.orphans

    async def remove(self, hold_id: str) -> None:
        self.removed.append(hold_id)


class _Network:
    def __init__(self, jobs: list[RelayedJob]) -> None:
        self.jobs = jobs

    async def job_records(self, job_ids: Sequence[str]) -> list[RelayedJob]:
        return [job for job in self.jobs if job.job_id in job_ids]


class _Settler:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.settled: list[Settlement] = []

    async def settle(self, settlement: Settlement) -> int:
        if self.refuse:
            raise HoldAlreadyResolved("the hold is already resolved")
        self.settled.append(settlement)
        return settlement.capture


def _sweeper(
    orphaned_for_s: float, jobs: list[RelayedJob], settler: _Settler
) -> tuple[OrphanSweeper, _Store]:
    store = _Store([Orphan(_request(jobs=1), orphaned_for_s)])
    sweeper = OrphanSweeper(
        store,  # type: ignore[arg-type]
        _Network(jobs),  # type: ignore[arg-type]
        settler,
        claim_s=1.0,
        running_grace_s=5.0,
    )
    return sweeper, store


RUNNING = RelayedJob("j0", Usage(4, 3), (("n1", "op1"),), ended=False)


async def test_a_running_job_is_waited_for_then_settled_as_recorded() -> None:
    settler = _Settler()
    waiting, store = _sweeper(1.0, [RUNNING], settler)
    assert await waiting.sweep() == 0
    assert (settler.settled, store.removed) == ([], [])
    overdue, store = _sweeper(6.0, [RUNNING], settler)
    assert await overdue.sweep() == 1
    assert [s.capture for s in settler.settled] == [4 + 6]
    assert store.removed == ["h"]


async def test_a_hold_resolved_already_is_forgotten() -> None:
    sweeper, store = _sweeper(0.0, [], _Settler(refuse=True))
    assert await sweeper.sweep() == 1
    assert store.removed == ["h"]
