"""The settlement queue contract against both implementations, RabbitMQ included."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from resultity.account.v1.ledger_service_pb2 import SettleHoldRequest

from core.errors import HoldAlreadyResolved
from core.namespace import AmqpNames
from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlement_proto import settlement_from_pb
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.settlements import Settlement
from tests.settlement_queue_contract import *  # noqa: F403
from tests.settlement_queue_contract import SETTLEMENT, MakeQueue


@pytest.fixture(params=["in-process", "rabbitmq"])
def make_queue(request: pytest.FixtureRequest) -> MakeQueue:
    if request.param == "in-process":
        return lambda: InProcessSettlementQueue(first_retry_s=0.01, max_retry_s=0.05)
    url, names = request.getfixturevalue("amqp_url"), request.getfixturevalue("amqp_names")
    return lambda: AmqpSettlementQueue(url, names, retry_s=0.05)


async def test_rabbitmq_keeps_a_refused_settlement_in_the_dead_letter_queue(
    amqp_url: str, amqp_names: AmqpNames
) -> None:
    queue = AmqpSettlementQueue(amqp_url, amqp_names, retry_s=0.05)

    async def refuse(settlement: Settlement) -> None:
        raise HoldAlreadyResolved("The hold is already released with 0 captured")

    connection = await aio_pika.connect(amqp_url)
    try:
        await queue.consume(refuse)
        await queue.publish(SETTLEMENT)
        channel = await connection.channel()
        dead = amqp_names.dead_letter(amqp_names.settlements)
        async with asyncio.timeout(20):
            while (message := await _get(channel, dead)) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert message.message_id == SETTLEMENT.idempotency_key
        assert settlement_from_pb(SettleHoldRequest.FromString(message.body)) == SETTLEMENT
        await message.ack()
    finally:
        await queue.close()
        await connection.close()


async def _get(channel: AbstractChannel, name: str) -> AbstractIncomingMessage | None:
    queue = await channel.declare_queue(name, passive=True)
    return await queue.get(fail=False)
