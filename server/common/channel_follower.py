"""Following a channel of the fan-out bus (bus.py): each message handed to a
handler, through losses of the connection.

The bus may lose a message (a replica reconnecting to Redis), so a follower can
catch up after resubscribing and every ``poll_s``: with a ``catch_up`` that
reads the system of record (or drops what may be stale), a missed message
delays a change, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from server.common.bus import Bus, Subscription

log = structlog.get_logger(__name__)


class ChannelFollower:
    def __init__(
        self,
        bus: Bus,
        channel: str,
        on_message: Callable[[bytes], Awaitable[None]],
        *,
        catch_up: Callable[[], Awaitable[None]] | None = None,
        poll_s: float | None = 30.0,
        retry_s: float = 1.0,
    ) -> None:
        """``on_message`` handles each announcement; ``catch_up``, if given, reads
        the current state after a resubscription and every ``poll_s`` (None: only
        after a resubscription)."""
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
        if self._catch_up is not None and self._poll_s is not None:
            self._tasks.append(
                asyncio.create_task(self._poll(self._catch_up, self._poll_s), name="poll")
            )

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

    async def _poll(self, catch_up: Callable[[], Awaitable[None]], poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            await self._quietly(catch_up())

    async def _quietly(self, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            log.exception("handling an announcement failed", channel=self._channel)
