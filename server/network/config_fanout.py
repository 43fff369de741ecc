"""Keeping every replica on the newest network configuration.

The replica that stores a new version announces it on the bus (bus.py);
every replica, on the message, reads the newest version from the store and
pushes it to its agents. The bus may lose a message (a replica reconnecting
to Redis), so each replica also re-reads the store after resubscribing and
every ``poll_s``: a missed announcement delays a change, never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from server.common.bus import Bus, Subscription

log = structlog.get_logger(__name__)


def config_channel(network_id: str) -> str:
    return f"resultity:network:{network_id}:config"


class ConfigFanout:
    def __init__(
        self,
        bus: Bus,
        network_id: str,
        refresh: Callable[[int], Awaitable[None]],
        *,
        poll_s: float = 30.0,
        retry_s: float = 1.0,
    ) -> None:
        """``refresh(version)`` catches up with the store; ``version`` is the announced
        one, or 0 when unknown (a poll)."""
        self._bus = bus
        self._channel = config_channel(network_id)
        self._refresh = refresh
        self._poll_s = poll_s
        self._retry_s = retry_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Subscribed when this returns: no later announcement is missed."""
        subscription = await self._bus.subscribe(self._channel)
        self._tasks = [
            asyncio.create_task(self._follow(subscription), name="config-follow"),
            asyncio.create_task(self._poll(), name="config-poll"),
        ]

    async def announce(self, version: int) -> None:
        try:
            await self._bus.publish(self._channel, str(version).encode())
        except Exception:
            # The other replicas still pick the version up on their next poll.
            log.exception("configuration announcement failed", version=version)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, subscription: Subscription) -> None:
        while True:
            try:
                async for message in subscription:
                    await self._refresh_quietly(_version(message))
            except Exception:
                log.exception("configuration channel lost; resubscribing")
            finally:
                with contextlib.suppress(Exception):
                    await subscription.close()
            subscription = await self._resubscribe()
            await self._refresh_quietly(0)

    async def _resubscribe(self) -> Subscription:
        while True:
            await asyncio.sleep(self._retry_s)
            try:
                return await self._bus.subscribe(self._channel)
            except Exception:
                log.warning("configuration channel unreachable", channel=self._channel)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._refresh_quietly(0)

    async def _refresh_quietly(self, version: int) -> None:
        try:
            await self._refresh(version)
        except Exception:
            log.exception("configuration refresh failed", version=version)


def _version(message: bytes) -> int:
    try:
        return int(message)
    except ValueError:
        log.warning("unreadable configuration announcement", message=message[:64])
        return 0
