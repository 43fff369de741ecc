"""A fan-out bus: each message published on a channel reaches every current
subscriber of that channel, in this process and in every other one.

Delivery is at most once (a subscriber that is reconnecting misses what was
published meanwhile), so a message only says that something changed; the
subscriber reads the change itself from the system of record. Adapters:
bus_memory.py (one process) and bus_redis.py (Redis pub/sub); connect_bus in
bus_connect.py picks one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]:
        """The channel's messages from the moment of subscribing, in order."""
        ...

    async def close(self) -> None: ...


class Bus(Protocol):
    async def publish(self, channel: str, message: bytes) -> None: ...

    async def subscribe(self, channel: str) -> Subscription:
        """Subscribed when this returns: no later message is missed."""
        ...

    async def close(self) -> None: ...
