"""Where a service's replicas share hot state: Redis when RESULTITY_REDIS_URL (or
--redis-url) names one, else this process alone (one machine, `resultity up`).
Never the source of truth for money: that is PostgreSQL."""

from __future__ import annotations

from redis.asyncio import Redis

from server.common.invalidation import InvalidationBus, LocalBus
from server.common.redis_client import connect
from server.common.redis_invalidation import RedisBus


class SharedState:
    def __init__(self, redis_url: str | None = None) -> None:
        self.redis: Redis | None = connect(redis_url) if redis_url else None
        self._redis_bus = RedisBus(self.redis) if self.redis is not None else None
        self.bus: InvalidationBus = self._redis_bus or LocalBus()

    async def close(self) -> None:
        if self._redis_bus is not None:
            await self._redis_bus.close()
        if self.redis is not None:
            await self.redis.aclose()
