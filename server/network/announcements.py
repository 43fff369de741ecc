"""What one replica announces to the others over the fan-out bus (bus.py).

An announcement only says that something changed (a configuration version, a
node's standing); each replica reads the change itself from PostgreSQL. The
bus may lose a message (a replica reconnecting to Redis), so a follower can
also catch up from the store after resubscribing and every ``poll_s``: a
missed announcement then delays a change, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from server.common.bus import Bus, Subscription

log = structlog.get_logger(__name__)


def network_channel(network_id: str, topic: str) -> str:
    return f"resultity:network:{network_id}:{topic}"


class ChannelFollower:
    def __init__(
        self,
        bus: Bus,
        channel: str,
        on_message: Callable[[bytes], Awaitable[None]],
        *,
        catch_up: Callable[[], Awaitable[None]] | None = None,
        poll_s: float = 30.0,
        retry_s: float = 1.0,
    ) -> None:
        """``on_message`` handles each announcement; ``catch_up``, if given, reads
        the current state after a resubscription and every ``poll_s``."""
        self._bus = bus
        self._channel = channel
        self._on_message = on_message
        self._catch_up = catch_up
        self._poll_s = poll_s
        self._retry_s = retry_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Subscribed when this returns: no later announcement is missed."""
        subscription = await self._bus.subscribe(self._channel)
        self._tasks.append(asyncio.create_task(self._follow(subscription), name="follow"))
        if self._catch_up is not None:
            self._tasks.append(asyncio.create_task(self._poll(self._catch_up), name="poll"))

    async def announce(self, message: bytes) -> None:
        try:
            await self._bus.publish(self._channel, message)
        except Exception:
            # The other replicas catch up when they poll, or when the node reconnects.
            log.exception("announcement failed", channel=self._channel)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _follow(self, subscription: Subscription) -> None:
        while True:
            try:
                async for message in subscription:
                    await self._quietly(self._on_message(message))
            except Exception:
                log.exception("channel lost; resubscribing", channel=self._channel)
            finally:
                with contextlib.suppress(Exception):
                    await subscription.close()
            subscription = await self._resubscribe()
            if self._catch_up is not None:
                await self._quietly(self._catch_up())

    async def _resubscribe(self) -> Subscription:
        while True:
            await asyncio.sleep(self._retry_s)
            try:
                return await self._bus.subscribe(self._channel)
            except Exception:
                log.warning("channel unreachable", channel=self._channel)

    async def _poll(self, catch_up: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._quietly(catch_up())

    async def _quietly(self, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            log.exception("handling an announcement failed", channel=self._channel)


def version_of(message: bytes) -> int:
    """A configuration announcement's version; 0 if unreadable."""
    try:
        return int(message)
    except ValueError:
        log.warning("unreadable configuration announcement", message=message[:64])
        return 0
