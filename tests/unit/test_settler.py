"""Settler: direct first, then the queue, then memory; nothing lost, nothing twice."""

from __future__ import annotations

import pytest

from core.errors import HoldAlreadyResolved
from server.cloud.settler import Settler
from server.common.settlements import (
    LedgerUnavailable,
    OperatorShares,
    QueueUnavailable,
    Settlement,
    SettlementHandler,
)
from tests.harness import eventually

SETTLEMENT = Settlement("hold-1", 700)


class _Ledger:
    def __init__(self) -> None:
        self.up = True
        self.refuse = False
        self.applied: list[str] = []

    async def settle_hold(self, hold_id: str, capture: int, shares: OperatorShares) -> int:
        if not self.up:
            raise LedgerUnavailable("account down")
        if self.refuse:
            raise HoldAlreadyResolved("The hold is already released with 0 captured")
        self.applied.append(hold_id)
        return capture


class _Queue:
    def __init__(self) -> None:
        self.up = True
        self.published: list[Settlement] = []

    async def publish(self, settlement: Settlement) -> None:
        if not self.up:
            raise QueueUnavailable("broker down")
        self.published.append(settlement)

    async def consume(self, handler: SettlementHandler) -> None:
        raise AssertionError("not consumed here")

    async def pending(self) -> int:
        return len(self.published)

    async def close(self) -> None:
        pass


async def test_a_reachable_ledger_settles_directly() -> None:
    ledger, queue = _Ledger(), _Queue()
    assert await Settler(ledger, queue).settle(SETTLEMENT) == 700
    assert (ledger.applied, queue.published) == (["hold-1"], [])


async def test_an_unreachable_ledger_defers_to_the_queue() -> None:
    ledger, queue = _Ledger(), _Queue()
    ledger.up = False
    assert await Settler(ledger, queue).settle(SETTLEMENT) == 700
    assert (ledger.applied, queue.published) == ([], [SETTLEMENT])


async def test_with_the_queue_down_too_the_first_to_come_back_takes_it_once() -> None:
    ledger, queue = _Ledger(), _Queue()
    ledger.up = queue.up = False
    settler = Settler(ledger, queue, first_retry_s=0.01, max_retry_s=0.02)
    assert await settler.settle(SETTLEMENT) == 700
    assert settler.backlog() == 1
    queue.up = True
    await eventually(lambda: settler.backlog() == 0)
    ledger.up = True
    await settler.close()
    assert (ledger.applied, queue.published) == ([], [SETTLEMENT])


async def test_a_refusal_from_the_ledger_leaves_the_backlog_with_a_log_line() -> None:
    ledger, queue = _Ledger(), _Queue()
    ledger.up = queue.up = False
    settler = Settler(ledger, queue, first_retry_s=0.01, max_retry_s=0.02)
    await settler.settle(SETTLEMENT)
    ledger.up, ledger.refuse = True, True
    await eventually(lambda: settler.backlog() == 0)
    assert (ledger.applied, queue.published) == ([], [])


async def test_a_direct_refusal_reaches_the_caller() -> None:
    ledger, queue = _Ledger(), _Queue()
    ledger.refuse = True
    with pytest.raises(HoldAlreadyResolved):
        await Settler(ledger, queue).settle(SETTLEMENT)
    assert queue.published == []
