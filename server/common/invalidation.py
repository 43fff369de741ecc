"""Telling every replica that a cached entry is stale.

Cloud caches successful key lookups and subcloud resolutions for a few seconds.
When a key is revoked, an account disabled or its limits changed (the account
layer publishes), or a subcloud changed, archived or lost a member (cloud
publishes), an ``Invalidation`` goes out on the bus and every subscribed replica
drops the entries it names at once; the cache's TTL stays the bound when a
message is lost. ``LocalBus`` delivers within one process (one replica, and
`resultity up`); server/common/redis_invalidation.py across replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)


class Subject(StrEnum):
    API_KEY = "api_key"
    ACCOUNT = "account"
    SUBCLOUD = "subcloud"


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What changed: one API key, everything of one account, or one subcloud."""

    subject: Subject
    id: str

    def encode(self) -> str:
        return f"{self.subject}:{self.id}"

    @classmethod
    def decode(cls, text: str) -> Invalidation | None:
        """None for a message this version does not know."""
        subject, _, id_ = text.partition(":")
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


class InvalidationBus(Protocol):
    async def publish(self, change: Invalidation) -> None:
        """Tells every subscriber; never raises (the caches' TTL covers a lost message)."""
        ...

    def subscribe(self, listener: InvalidationListener) -> None: ...


class LocalBus:
    """Delivers to this process's subscribers, at once."""

    def __init__(self) -> None:
        self._listeners: list[InvalidationListener] = []

    async def publish(self, change: Invalidation) -> None:
        deliver(self._listeners, change)

    def subscribe(self, listener: InvalidationListener) -> None:
        self._listeners.append(listener)


def deliver(listeners: list[InvalidationListener], change: Invalidation) -> None:
    for listener in listeners:
        listener.invalidate(change)
    log.debug("cache entries invalidated", subject=change.subject, id=change.id)
