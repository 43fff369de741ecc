"""The settlement queue contract against both implementations, RabbitMQ included."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from resultity.account.v1.ledger_service_pb2 import SettleHoldRequest

from core.errors import HoldAlreadyResolved
from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlement_proto import settlement_from_pb
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.settlements import Settlement
from tests.settlement_queue_contract import *  # noqa: F403
from tests.settlement_queue_contract import SETTLEMENT, MakeQueue


@pytest.fixture(params=["in-process", "rabbitmq"])
async def make_queue(request: pytest.FixtureRequest, amqp_url: str) -> AsyncIterator[MakeQueue]:
    if request.param == "in-process":
        yield lambda: InProcessSettlementQueue(first_retry_s=0.01, max_retry_s=0.05)
        return
    name = f"test.settlements.{uuid.uuid4().hex[:8]}"
    yield lambda: AmqpSettlementQueue(amqp_url, name=name, retry_s=0.05)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dead"):
            await channel.queue_delete(queue)
        await channel.exchange_delete(f"{name}.dead")


async def test_rabbitmq_keeps_a_refused_settlement_in_the_dead_letter_queue(amqp_url: str) -> None:
    name = f"test.settlements.{uuid.uuid4().hex[:8]}"
    queue = AmqpSettlementQueue(amqp_url, name=name, retry_s=0.05)

    async def refuse(settlement: Settlement) -> None:
        raise HoldAlreadyResolved("The hold is already released with 0 captured")

    connection = await aio_pika.connect(amqp_url)
    try:
        await queue.consume(refuse)
        await queue.publish(SETTLEMENT)
        channel = await connection.channel()
        async with asyncio.timeout(20):
            while (message := await _get(channel, f"{name}.dead")) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert message.message_id == SETTLEMENT.idempotency_key
        assert settlement_from_pb(SettleHoldRequest.FromString(message.body)) == SETTLEMENT
        await message.ack()
    finally:
        await queue.close()
        channel = await connection.channel()
        for queue_name in (name, f"{name}.dead"):
            await channel.queue_delete(queue_name)
        await channel.exchange_delete(f"{name}.dead")
        await connection.close()


async def _get(channel: AbstractChannel, name: str) -> AbstractIncomingMessage | None:
    queue = await channel.declare_queue(name, passive=True)
    return await queue.get(fail=False)
