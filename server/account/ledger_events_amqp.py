"""The ledger event bus on RabbitMQ: a durable topic exchange (routing key = the
event's kind) of persistent JSON messages published with confirms; each consumer
reads its own durable queue with manual acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from core.errors import InvalidArgument
from core.namespace import AmqpNames
from server.account.ledger_events import EventHandler, LedgerEvent
from server.common import amqp

log = structlog.get_logger(__name__)


class AmqpLedgerEvents:
    def __init__(self, url: str, names: AmqpNames, *, retry_s: float = 1.0) -> None:
        self._url = url
        self._names = names
        self._retry_s = retry_s
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting = asyncio.Lock()
        self._consumers: list[asyncio.Task[None]] = []
        # (kind, queue name) of each subscription, declared by the publisher too.
        self._bindings: list[tuple[str, str]] = []

    async def publish(self, events: Sequence[LedgerEvent]) -> None:
        exchange = await self._publishing_exchange()
        for event in events:
            # Confirmed one by one: the relay marks the batch published only after all.
            await exchange.publish(
                aio_pika.Message(
                    encode(event),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=str(event.event_id),
                    content_type="application/json",
                    timestamp=event.created_at,
                ),
                event.kind,
                timeout=amqp.PUBLISH_TIMEOUT_S,
            )

    async def subscribe(self, kind: str, consumer: str, handler: EventHandler) -> None:
        queue = self._names.ledger_queue(consumer)
        self._bindings.append((kind, queue))
        task = asyncio.create_task(self._consume(kind, queue, handler), name=queue)
        self._consumers.append(task)

    async def close(self) -> None:
        for task in self._consumers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._consumers.clear()
        if self._connection is not None:
            await self._connection.close()
            self._connection = self._channel = self._exchange = None

    async def _publishing_exchange(self) -> AbstractExchange:
        async with self._connecting:
            if self._connection is None:
                self._connection = await amqp.connect(self._url)
            if self._channel is None or self._channel.is_closed or self._exchange is None:
                self._channel = await self._connection.channel(publisher_confirms=True)
                exchange = await self._declare_exchange(self._channel)
                # A consumer's queue may not be bound yet when the first events go out
                # (its task starts alongside the relay): bound here, none is lost.
                for kind, name in self._bindings:
                    queue = await amqp.declare_work_queue(self._channel, name)
                    await queue.bind(exchange, kind)
                self._exchange = exchange
            return self._exchange

    async def _declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self._names.ledger_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _consume(self, kind: str, name: str, handler: EventHandler) -> None:
        connection = await amqp.connect_eventually(self._url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=32)
            exchange = await self._declare_exchange(channel)
            queue = await amqp.declare_work_queue(channel, name)
            await queue.bind(exchange, kind)

            async def handle(message: AbstractIncomingMessage) -> None:
                await handler(decode(message.body))

            await queue.consume(amqp.acknowledging(handle, retry_s=self._retry_s))
            log.info("consuming ledger events", kind=kind, queue=name)
            await asyncio.Future()  # until cancelled; the connection restores the consumer
        finally:
            await connection.close()


def encode(event: LedgerEvent) -> bytes:
    return json.dumps(
        {
            "event_id": str(event.event_id),
            "kind": event.kind,
            "created_at": event.created_at.isoformat(),
            "payload": event.payload,
        }
    ).encode()


def decode(body: bytes) -> LedgerEvent:
    try:
        document = json.loads(body)
        return LedgerEvent(
            UUID(document["event_id"]),
            document["kind"],
            document["payload"],
            datetime.fromisoformat(document["created_at"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument(f"not a ledger event: {error}") from None
