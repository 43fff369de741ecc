"""The invalidation bus over Redis pub/sub: every replica subscribed to one channel.

Pub/sub delivers to whoever is connected at that moment, nothing is stored: a
replica that was disconnected drops all its cached entries when it subscribes
again, since it may have missed changes. Publishing never fails the change it
announces (that is committed already); a message lost to an outage leaves the
caches' TTL as the bound.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from redis.asyncio import Redis

from server.common.invalidation import Invalidation, InvalidationListener, deliver
from server.common.redis_client import UNAVAILABLE

log = structlog.get_logger(__name__)

CHANNEL = "resultity:invalidations"


class RedisBus:
    def __init__(
        self,
        redis: Redis,
        *,
        channel: str = CHANNEL,
        retry_s: float = 0.5,
        max_retry_s: float = 5.0,
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._listeners: list[InvalidationListener] = []
        self._subscriber: asyncio.Task[None] | None = None
        # Set while subscribed (tests and shutdown wait on it).
        self.subscribed = asyncio.Event()

    async def publish(self, change: Invalidation) -> None:
        try:
            await self._redis.publish(self._channel, change.encode())
        except UNAVAILABLE as error:
            log.warning(
                "invalidation not published; caches expire on their own",
                subject=change.subject,
                id=change.id,
                error=str(error),
            )

    def subscribe(self, listener: InvalidationListener) -> None:
        """Adds ``listener``; the first one starts listening to the channel."""
        self._listeners.append(listener)
        if self._subscriber is None:
            self._subscriber = asyncio.create_task(self._listen(), name="invalidation-bus")

    async def _listen(self) -> None:
        delay = self._retry_s
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    # Whatever changed while not subscribed was missed.
                    for listener in self._listeners:
                        listener.invalidate_all()
                    self.subscribed.set()
                    delay = self._retry_s
                    log.info("listening for invalidations", channel=self._channel)
                    async for message in pubsub.listen():
                        self._received(message)
            except UNAVAILABLE as error:
                if self.subscribed.is_set():
                    log.warning("invalidation bus disconnected", error=str(error))
                self.subscribed.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_s)

    def _received(self, message: dict[str, object]) -> None:
        data = message.get("data")
        change = Invalidation.decode(data.decode()) if isinstance(data, bytes) else None
        if change is None:
            log.warning("unknown invalidation message ignored", message=repr(data))
            return
        deliver(self._listeners, change)

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
            self._subscriber = None
        self.subscribed.clear()
