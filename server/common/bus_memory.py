"""The fan-out bus within one process (bus.py), when no Redis is configured."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

# Marks a closed subscription in its queue.
_CLOSED = None


class MemorySubscription:
    def __init__(self, bus: MemoryBus, channel: str) -> None:
        self._bus = bus
        self._channel = channel
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (message := await self.queue.get()) is not _CLOSED:
            yield message

    async def close(self) -> None:
        self._bus.unsubscribe(self._channel, self)
        self.queue.put_nowait(_CLOSED)


class MemoryBus:
    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[MemorySubscription]] = defaultdict(set)

    async def publish(self, channel: str, message: bytes) -> None:
        for subscription in self._subscribers.get(channel, ()):
            subscription.queue.put_nowait(message)

    async def subscribe(self, channel: str) -> MemorySubscription:
        subscription = MemorySubscription(self, channel)
        self._subscribers[channel].add(subscription)
        return subscription

    def unsubscribe(self, channel: str, subscription: MemorySubscription) -> None:
        self._subscribers[channel].discard(subscription)

    async def close(self) -> None:
        for subscriptions in list(self._subscribers.values()):
            for subscription in list(subscriptions):
                await subscription.close()
