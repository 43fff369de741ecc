"""Where a service's replicas share hot state: Redis when RESULTITY_REDIS_URL (or
--redis-url) names one, else this process alone (one machine, `resultity up`).
Never the source of truth for money: that is PostgreSQL. What is shared is named
under the deployment's namespace (core/namespace.py)."""

from __future__ import annotations

from redis.asyncio import Redis

from core.namespace import RedisNames
from server.common.bus_connect import connect_bus
from server.common.invalidation import Invalidations
from server.common.redis_client import connect


class SharedState:
    def __init__(self, redis_url: str | None = None, names: RedisNames | None = None) -> None:
        """``names`` unset: the default namespace's."""
        self.names = names or RedisNames()
        # The rate-limit counters' client; the bus keeps its own connections.
        self.redis: Redis | None = connect(redis_url) if redis_url else None
        self._bus = connect_bus(redis_url)
        self.invalidations = Invalidations(self._bus, self.names.invalidations)

    @classmethod
    async def open(
        cls, redis_url: str | None = None, names: RedisNames | None = None
    ) -> SharedState:
        """Listening for invalidations when this returns (Redis must answer)."""
        shared = cls(redis_url, names)
        await shared.invalidations.start()
        return shared

    async def close(self) -> None:
        await self.invalidations.stop()
        await self._bus.close()
        if self.redis is not None:
            await self.redis.aclose()
