"""Namespaces of the tests' own in the machine's shared Redis and RabbitMQ
(core/namespace.py), and their removal afterwards.

Every namespace of one run begins with ``RUN``: two runs on one machine (or a
run beside a deployment) never meet, and whatever a killed run left behind is
found by its prefix.
"""

from __future__ import annotations

import uuid

import aio_pika
import redis.asyncio as redis

from core.namespace import AmqpNames
from server.account.earnings import CONSUMER as EARNINGS_CONSUMER
from server.account.usage import CONSUMER as USAGE_CONSUMER

RUN = f"t{uuid.uuid4().hex[:8]}"


def new_namespace() -> str:
    """A namespace no other test or run uses."""
    return f"{RUN}-{uuid.uuid4().hex[:12]}"


async def forget_redis(url: str, namespace: str) -> None:
    """Deletes every key of ``namespace``."""
    client = redis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def forget_amqp(url: str, names: AmqpNames) -> None:
    """Deletes the queues and exchanges ``names`` declares (those never declared
    are skipped)."""
    queues = (
        names.settlements,
        names.ledger_queue(EARNINGS_CONSUMER),
        names.ledger_queue(USAGE_CONSUMER),
    )
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
            await channel.queue_delete(names.dead_letter(queue))
            await channel.exchange_delete(names.dead_letter(queue))
        await channel.exchange_delete(names.ledger_exchange)
