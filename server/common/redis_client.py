"""The Redis client every control-plane adapter uses (RESULTITY_REDIS_URL).

Short timeouts and a single retry: callers on the request path fall back to
their per-replica behaviour when Redis does not answer, so a slow failure costs
more than a fast one. The one retry covers a pooled connection Redis closed
(restarted); the pool reconnects on the next command once Redis is back.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

TIMEOUT_S = 1.0

# What "Redis is unreachable or failing" looks like to a caller.
UNAVAILABLE: tuple[type[Exception], ...] = (RedisError, OSError)


def connect(url: str) -> Redis:
    """A client for ``url`` (redis://HOST:PORT/DB); connects on first use."""
    return Redis.from_url(
        url,
        socket_timeout=TIMEOUT_S,
        socket_connect_timeout=TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        # Notices a half-open pub/sub connection.
        health_check_interval=10,
    )
