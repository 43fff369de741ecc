"""The settlement queue on RabbitMQ: a durable queue of persistent messages,
published with confirms and consumed with manual acknowledgements.

Publishing connects on first use, so a process starts while the broker is down
(a publish then fails with QueueUnavailable and the caller keeps the
settlement). Each message is a serialized ``SettleHoldRequest`` whose
``message_id`` is the settlement's idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from google.protobuf.message import DecodeError
from resultity.account.v1 import ledger_service_pb2 as ledger_pb

from core.errors import InvalidArgument
from core.namespace import AmqpNames
from server.common import amqp
from server.common.settlement_proto import settlement_from_pb, settlement_to_pb
from server.common.settlements import QueueUnavailable, Settlement, SettlementHandler

log = structlog.get_logger(__name__)

_CONTENT_TYPE = "application/x-protobuf"
_MESSAGE_TYPE = ledger_pb.SettleHoldRequest.DESCRIPTOR.full_name


class AmqpSettlementQueue:
    def __init__(
        self, url: str, names: AmqpNames, *, retry_s: float = 1.0, prefetch: int = 16
    ) -> None:
        self._url = url
        self._name = names.settlements
        self._retry_s = retry_s
        self._prefetch = prefetch
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._connecting = asyncio.Lock()
        self._consumer: asyncio.Task[None] | None = None
        # Delivered to this process and not yet acknowledged (applying or waiting to retry).
        self._in_flight = 0

    async def publish(self, settlement: Settlement) -> None:
        message = aio_pika.Message(
            settlement_to_pb(settlement).SerializeToString(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=settlement.idempotency_key,
            content_type=_CONTENT_TYPE,
            type=_MESSAGE_TYPE,
        )
        try:
            channel = await self._publishing_channel()
            # With publisher confirms this returns once the broker has the message
            # on disk (mandatory: an unroutable message is an error, not a loss).
            await channel.default_exchange.publish(
                message, self._name, mandatory=True, timeout=amqp.PUBLISH_TIMEOUT_S
            )
        except Exception as error:
            raise QueueUnavailable(f"settlement queue unavailable: {error!r}") from error

    async def consume(self, handler: SettlementHandler) -> None:
        if self._consumer is not None:
            raise RuntimeError("the queue already has a consumer")
        self._consumer = asyncio.create_task(self._consume(handler), name="settlement-consumer")

    async def pending(self) -> int:
        """Ready in the broker plus being applied here (another replica's in-flight
        messages are not counted: those holds are locked while they settle)."""
        try:
            await self._publishing_channel()
            assert self._connection is not None  # made by the channel
            return self._in_flight + await amqp.waiting_messages(self._connection, self._name)
        except Exception as error:
            raise QueueUnavailable(f"settlement queue unavailable: {error!r}") from error

    async def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = self._channel = None

    async def _publishing_channel(self) -> AbstractChannel:
        async with self._connecting:
            if self._connection is None:
                self._connection = await amqp.connect(self._url)
            if self._channel is None or self._channel.is_closed:
                channel = await self._connection.channel(publisher_confirms=True)
                await amqp.declare_work_queue(channel, self._name)
                self._channel = channel
            return self._channel

    async def _consume(self, handler: SettlementHandler) -> None:
        connection = await amqp.connect_eventually(self._url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await amqp.declare_work_queue(channel, self._name)

            async def apply(message: AbstractIncomingMessage) -> None:
                await handler(_decode(message))

            acknowledged = amqp.acknowledging(apply, retry_s=self._retry_s)

            async def counted(message: AbstractIncomingMessage) -> None:
                # Counted until acknowledged or back in the queue (retries wait here).
                self._in_flight += 1
                try:
                    await acknowledged(message)
                finally:
                    self._in_flight -= 1

            await queue.consume(counted)
            log.info("consuming settlements", queue=self._name)
            await asyncio.Future()  # until cancelled; the connection restores the consumer
        finally:
            await connection.close()


def _decode(message: AbstractIncomingMessage) -> Settlement:
    try:
        return settlement_from_pb(ledger_pb.SettleHoldRequest.FromString(message.body))
    except DecodeError:
        raise InvalidArgument(f"not a {_MESSAGE_TYPE}: {message.message_id}") from None
