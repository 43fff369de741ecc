"""RabbitMQ plumbing shared by the settlement queue and the ledger events: a
connection that outlives the broker's restarts, queues with a dead-letter queue,
and consumption with manual acknowledgements."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from core.namespace import AmqpNames
from server.common.settlements import is_refusal

log = structlog.get_logger(__name__)

# Waiting for the broker's confirmation of a publish, and for a connection.
PUBLISH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0

MessageHandler = Callable[[AbstractIncomingMessage], Awaitable[None]]


async def connect(url: str) -> AbstractRobustConnection:
    """A connection that reconnects (and restores its consumers) by itself once made;
    raises when the broker cannot be reached now."""
    return await aio_pika.connect_robust(url, timeout=CONNECT_TIMEOUT_S)


async def connect_eventually(url: str, *, max_retry_s: float = 10.0) -> AbstractRobustConnection:
    """Like ``connect``, retrying with a backoff until the broker answers."""
    delay = 0.5
    while True:
        try:
            return await connect(url)
        except Exception as error:
            log.warning("message broker unreachable; retrying", error=str(error), retry_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_retry_s)


async def declare_work_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    """A durable queue whose rejected messages go to the durable queue of its dead
    letters (``AmqpNames.dead_letter``)."""
    dead = AmqpNames.dead_letter(name)
    exchange = await channel.declare_exchange(dead, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(dead, durable=True)
    await dead_queue.bind(exchange)
    return await channel.declare_queue(
        name, durable=True, arguments={"x-dead-letter-exchange": dead}
    )


async def waiting_messages(connection: AbstractConnection, name: str) -> int:
    """Messages ready in the queue ``name`` (not counting those being handled).

    Asked on a channel of its own: a channel that declared the queue before answers
    from what it remembers of that declaration.
    """
    async with await connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


def acknowledging(handler: MessageHandler, *, retry_s: float) -> MessageHandler:
    """Wraps ``handler`` so that a message is acknowledged only after it returns.

    A refusal (``is_refusal``) rejects the message into the dead-letter queue with a
    log line; any other failure returns it to the queue after ``retry_s``, to be
    delivered again (the handler must be idempotent).
    """

    async def consume(message: AbstractIncomingMessage) -> None:
        try:
            await handler(message)
        except Exception as error:
            if is_refusal(error):
                log.error(
                    "message refused; dead-lettered",
                    queue=message.routing_key,
                    message_id=message.message_id,
                    error=str(error),
                )
                await message.reject(requeue=False)
                return
            log.warning(
                "message failed; delivered again later",
                message_id=message.message_id,
                error=str(error),
                retry_s=retry_s,
            )
            await asyncio.sleep(retry_s)
            await message.nack(requeue=True)
            return
        await message.ack()

    return consume
