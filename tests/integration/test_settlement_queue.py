"""The settlement queue contract against both implementations, RabbitMQ included."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlement_queue import InProcessSettlementQueue
from tests.settlement_queue_contract import *  # noqa: F403
from tests.settlement_queue_contract import MakeQueue


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
