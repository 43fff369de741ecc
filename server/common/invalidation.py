"""Telling every replica that a cached entry is stale.

Cloud caches successful key lookups and subcloud resolutions for a few seconds.
When a key is revoked, an account disabled or its limits changed (the account
layer announces), or a subcloud changed, archived or lost a member (cloud
announces), an ``Invalidation`` goes out on the fan-out bus (bus.py) and every
replica drops the entries it names at once. The bus may lose a message while a
replica reconnects, so a replica that resubscribes drops everything it cached;
the caches' TTL bounds how long a lost message keeps an entry otherwise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import structlog

from server.common.bus import Bus
from server.common.channel_follower import ChannelFollower

log = structlog.get_logger(__name__)

ANNOUNCE_TIMEOUT_S = 1.0


class Subject(StrEnum):
    API_KEY = "api_key"
    ACCOUNT = "account"
    SUBCLOUD = "subcloud"


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What changed: one API key, everything of one account, or one subcloud."""

    subject: Subject
    id: str

    def encode(self) -> bytes:
        return f"{self.subject}:{self.id}".encode()

    @classmethod
    def decode(cls, message: bytes) -> Invalidation | None:
        """None for a message this version does not know."""
        subject, _, id_ = message.decode(errors="replace").partition(":")
        if subject not in Subject.__members__.values() or not id_:
            return None
        return cls(Subject(subject), id_)


class InvalidationListener(Protocol):
    def invalidate(self, change: Invalidation) -> None:
        """Drops what ``change`` names."""
        ...

    def invalidate_all(self) -> None:
        """Drops everything: changes may have been missed (the bus reconnected)."""
        ...


class Announcer(Protocol):
    async def announce(self, change: Invalidation) -> None:
        """Tells every replica; never raises (the caches' TTL covers a lost message)."""
        ...


class Invalidations:
    """Announces changes on ``channel`` of ``bus`` (``RedisNames.invalidations``) and
    hands every announced change, this replica's own included, to the listeners of
    this replica."""

    def __init__(self, bus: Bus, channel: str, *, retry_s: float = 1.0) -> None:
        self._listeners: list[InvalidationListener] = []
        self._follower = ChannelFollower(
            bus, channel, self._received, catch_up=self._missed, poll_s=None, retry_s=retry_s
        )

    def subscribe(self, listener: InvalidationListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        """Listening when this returns."""
        await self._follower.start()

    async def announce(self, change: Invalidation) -> None:
        # Bounded: the change is committed already, and a bus that does not answer
        # must not hold up the call that made it.
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT_S):
                await self._follower.announce(change.encode())
        except TimeoutError:
            log.warning("invalidation not announced in time", subject=change.subject)

    async def stop(self) -> None:
        await self._follower.stop()

    async def _received(self, message: bytes) -> None:
        change = Invalidation.decode(message)
        if change is None:
            log.warning("unknown invalidation ignored", message=message[:64])
            return
        for listener in self._listeners:
            listener.invalidate(change)

    async def _missed(self) -> None:
        for listener in self._listeners:
            listener.invalidate_all()
