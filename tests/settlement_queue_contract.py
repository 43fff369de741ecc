"""What every settlement queue does, whatever carries it (in-process or RabbitMQ).

A test module imports these tests and provides the ``make_queue`` fixture: a
factory of queues that all name the same queue (so a second one sees what the
first published), for the implementations it runs against.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from core.errors import HoldAlreadyResolved
from server.common.settlements import (
    LedgerUnavailable,
    OperatorLine,
    OperatorShares,
    Settlement,
    SettlementQueue,
)
from tests.harness import eventually

MakeQueue = Callable[[], SettlementQueue]

SETTLEMENT = Settlement(
    "5f0c7c1e-0000-4000-8000-000000000001",
    1_234,
    OperatorShares((OperatorLine("5f0c7c1e-0000-4000-8000-00000000000a", "n1", "m", 7),), 9),
)


async def test_a_published_settlement_reaches_the_consumer_intact(make_queue: MakeQueue) -> None:
    queue = make_queue()
    received: list[Settlement] = []

    async def handler(settlement: Settlement) -> None:
        received.append(settlement)

    try:
        await queue.publish(SETTLEMENT)
        await queue.consume(handler)
        await eventually(lambda: len(received) == 1)
        assert received == [SETTLEMENT]
        await asyncio.sleep(0.2)
        assert received == [SETTLEMENT]  # applied and acknowledged: not delivered again
        assert await queue.pending() == 0
    finally:
        await queue.close()


async def test_settlements_wait_until_a_consumer_comes(make_queue: MakeQueue) -> None:
    publisher = make_queue()
    second = Settlement("5f0c7c1e-0000-4000-8000-000000000002", 5)
    try:
        await publisher.publish(SETTLEMENT)
        await publisher.publish(second)
        assert await publisher.pending() == 2
        received: list[Settlement] = []

        async def handler(settlement: Settlement) -> None:
            received.append(settlement)

        await publisher.consume(handler)
        await eventually(lambda: len(received) == 2)
        assert sorted(received, key=lambda s: s.hold_id) == [SETTLEMENT, second]
    finally:
        await publisher.close()


async def test_a_failed_delivery_is_retried_until_the_ledger_takes_it(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    attempts: list[Settlement] = []
    applied: list[Settlement] = []

    async def handler(settlement: Settlement) -> None:
        attempts.append(settlement)
        if len(attempts) < 3:
            raise LedgerUnavailable("account down")
        applied.append(settlement)

    try:
        await queue.consume(handler)
        await queue.publish(SETTLEMENT)
        await eventually(lambda: len(applied) == 1)
        assert attempts == [SETTLEMENT] * 3
        await asyncio.sleep(0.2)
        assert applied == [SETTLEMENT]
        assert await queue.pending() == 0
    finally:
        await queue.close()


async def test_a_refused_settlement_is_dead_lettered_not_retried(make_queue: MakeQueue) -> None:
    queue = make_queue()
    attempts: list[Settlement] = []

    async def handler(settlement: Settlement) -> None:
        attempts.append(settlement)
        raise HoldAlreadyResolved("The hold is already released with 0 captured")

    try:
        await queue.consume(handler)
        await queue.publish(SETTLEMENT)
        await eventually(lambda: len(attempts) == 1)
        await asyncio.sleep(0.3)
        assert attempts == [SETTLEMENT]
        assert await queue.pending() == 0
    finally:
        await queue.close()
