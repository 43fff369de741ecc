"""What is particular to the shared counters: leases of requests in flight, and the
fall back to this replica's own counters while Redis does not answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from core.errors import RateLimited
from core.namespace import RedisNames
from server.cloud.rate_limits import LocalCounters, RateLimiter, Scope, Verdict
from server.cloud.redis_rate_limits import FallbackCounters, RedisCounters
from server.cloud.settings import RateLimitSettings
from server.common.redis_client import connect
from tests.unit.test_rate_limits import Clock

ONE_AT_A_TIME = RateLimitSettings(key_concurrent_requests=1)


class _Flaky:
    """Shared counters that fail while ``down``; otherwise in-process ones."""

    def __init__(self) -> None:
        self.down = False
        self.counters = LocalCounters()
        self.calls = 0

    async def acquire(
        self, lease: str, scopes: Sequence[Scope], tokens: int, now: float
    ) -> Verdict:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("connection refused")
        return await self.counters.acquire(lease, scopes, tokens, now)

    async def release(
        self, lease: str, scopes: Sequence[Scope], reserved: int, used: int, now: float
    ) -> None:
        if self.down:
            raise RedisConnectionError("connection refused")
        await self.counters.release(lease, scopes, reserved, used, now)


async def test_while_redis_is_down_each_replica_enforces_the_limits_alone() -> None:
    shared, local, monotonic = _Flaky(), LocalCounters(), Clock()
    fallback = FallbackCounters(shared, local, retry_s=1.0, clock=monotonic)
    limiter = RateLimiter(ONE_AT_A_TIME, counters=fallback, clock=Clock())
    shared.down = True

    running = await limiter.admit("key", "account", 0)  # not refused: counted here
    with pytest.raises(RateLimited):
        await limiter.admit("key", "account", 0)  # the local bound holds
    # Redis is not asked again until retry_s has passed.
    assert shared.calls == 1
    await running.release(0)  # released where it was admitted
    await (await limiter.admit("key", "account", 0)).release(0)
    assert shared.calls == 1


async def test_the_shared_counters_are_used_again_once_redis_answers() -> None:
    shared, local, monotonic = _Flaky(), LocalCounters(), Clock()
    fallback = FallbackCounters(shared, local, retry_s=1.0, clock=monotonic)
    limiter = RateLimiter(ONE_AT_A_TIME, counters=fallback, clock=Clock())
    shared.down = True
    during_outage = await limiter.admit("key", "account", 0)

    shared.down = False
    monotonic.now += 1.0
    after = await limiter.admit("key", "account", 0)  # decided by the shared counters
    assert shared.calls == 2
    with pytest.raises(RateLimited):
        await limiter.admit("key", "account", 0)
    # Each goes back to the counters that admitted it.
    await during_outage.release(0)
    with pytest.raises(RateLimited):
        await limiter.admit("key", "account", 0)
    await after.release(0)
    await limiter.admit("key", "account", 0)


async def test_a_failed_release_does_not_fail_the_request() -> None:
    shared = _Flaky()
    limiter = RateLimiter(ONE_AT_A_TIME, counters=FallbackCounters(shared), clock=Clock())
    admitted = await limiter.admit("key", "account", 0)
    shared.down = True
    with capture_logs() as logs:
        await admitted.release(0)  # raises nothing; the lease expires in Redis
    assert [entry["event"] for entry in logs] == ["releasing shared rate-limit counters failed"]


@pytest.fixture
async def redis_counters(
    redis_url: str, namespace: str
) -> AsyncIterator[tuple[RedisCounters, Clock]]:
    redis, clock = connect(redis_url), Clock()
    counters = RedisCounters(redis, RedisNames(namespace), lease_s=60, clock=clock)
    try:
        yield counters, clock
    finally:
        await counters.close()
        await redis.aclose()


@pytest.mark.integration
async def test_the_slot_of_a_replica_that_died_frees_when_its_lease_expires(
    redis_counters: tuple[RedisCounters, Clock],
) -> None:
    counters, clock = redis_counters
    dead = RateLimiter(ONE_AT_A_TIME, counters=counters, clock=clock)
    await dead.admit("key", "account", 0)  # never released: its replica died
    alive = RateLimiter(ONE_AT_A_TIME, counters=counters, clock=clock)
    with pytest.raises(RateLimited):
        await alive.admit("key", "account", 0)
    clock.now += 61
    await alive.admit("key", "account", 0)


@pytest.mark.integration
async def test_a_running_request_keeps_its_slot_while_its_lease_is_renewed(
    redis_counters: tuple[RedisCounters, Clock],
) -> None:
    counters, clock = redis_counters
    limiter = RateLimiter(ONE_AT_A_TIME, counters=counters, clock=clock)
    running = await limiter.admit("key", "account", 0)
    for _ in range(3):
        clock.now += 50
        await counters.renew()
        with pytest.raises(RateLimited):
            await limiter.admit("key", "account", 0)
    await running.release(0)
    await limiter.admit("key", "account", 0)
