"""The settlement queue contract, against the in-process queue (RabbitMQ's run in
tests/integration)."""

from __future__ import annotations

import pytest

from core.errors import InvalidArgument
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.settlements import Settlement
from tests.harness import eventually
from tests.settlement_queue_contract import *  # noqa: F403
from tests.settlement_queue_contract import SETTLEMENT, MakeQueue


@pytest.fixture
def make_queue() -> MakeQueue:
    return lambda: InProcessSettlementQueue(first_retry_s=0.01, max_retry_s=0.05)


async def test_the_in_process_queue_keeps_what_was_refused() -> None:
    queue = InProcessSettlementQueue()

    async def refuse(settlement: Settlement) -> None:
        raise InvalidArgument("capture exceeds the hold amount")

    await queue.consume(refuse)
    await queue.publish(SETTLEMENT)
    try:
        await eventually(lambda: bool(queue.dead_letters))
        assert queue.dead_letters == [SETTLEMENT]
        assert await queue.pending() == 0
    finally:
        await queue.close()
