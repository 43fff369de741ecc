"""Rate limits with a hand-driven clock: no sleeping, no timing thresholds.

A contract: every test runs against the in-process counters and against the
Redis ones (those runs need Redis: `make test-integration`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from core.errors import InvalidArgument, RateLimited
from core.namespace import RedisNames
from server.cloud.rate_limits import LimitCounters, LocalCounters, RateLimiter, Scope, Verdict
from server.cloud.redis_rate_limits import RedisCounters
from server.cloud.settings import RateLimitSettings
from server.common.rate_limits import RateLimits, validate_rate_limits
from server.common.redis_client import connect


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["in-process", pytest.param("redis", marks=pytest.mark.integration)])
async def counters(request: pytest.FixtureRequest) -> AsyncIterator[LimitCounters]:
    if request.param == "in-process":
        yield LocalCounters()
        return
    redis = connect(request.getfixturevalue("redis_url"))
    # A namespace of its own per test: the counters start empty.
    shared = RedisCounters(redis, RedisNames(request.getfixturevalue("namespace")))
    try:
        yield shared
    finally:
        await shared.close()
        await redis.aclose()


Limiter = Callable[..., RateLimiter]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(counters: LimitCounters, clock: Clock) -> Limiter:
    """A limiter with these default limits (RateLimitSettings fields) on the counters
    under test."""

    def make(**limits: int) -> RateLimiter:
        return RateLimiter(RateLimitSettings(**limits), counters=counters, clock=clock)

    return make


async def test_a_burst_beyond_requests_per_minute_is_refused_with_when_to_retry(
    limiter: Limiter, clock: Clock
) -> None:
    limits = limiter(key_requests_per_minute=3)
    for _ in range(3):
        await (await limits.admit("key", "account", 0)).release(0)

    with pytest.raises(RateLimited) as raised:
        await limits.admit("key", "account", 0)

    # One request comes back every 20 s at 3 per minute.
    assert raised.value.metadata["retry_after_s"] == "20"
    assert raised.value.metadata["x-ratelimit-remaining-requests"] == "0"
    assert raised.value.metadata["x-ratelimit-limit-requests"] == "3"
    clock.now += 20
    await limits.admit("key", "account", 0)


async def test_limits_are_per_key_and_per_account(limiter: Limiter) -> None:
    limits = limiter(key_requests_per_minute=1, account_requests_per_minute=2)
    await limits.admit("key-1", "account", 0)
    with pytest.raises(RateLimited):
        await limits.admit("key-1", "account", 0)
    await limits.admit("key-2", "account", 0)  # another key of the same account
    with pytest.raises(RateLimited):
        await limits.admit("key-3", "account", 0)  # the account's two are used
    await limits.admit("key-4", "other-account", 0)


async def test_a_refused_request_takes_nothing(limiter: Limiter) -> None:
    limits = limiter(key_requests_per_minute=5, account_requests_per_minute=1)
    await limits.admit("key", "account", 0)
    for _ in range(3):
        with pytest.raises(RateLimited):
            await limits.admit("key", "account", 0)  # the account's one is used
    # The key's bucket was not charged for the refusals: 4 of its 5 are left.
    for index in range(4):
        await limits.admit("key", f"other-account-{index}", 0)
    with pytest.raises(RateLimited):
        await limits.admit("key", "yet-another-account", 0)


async def test_tokens_are_reserved_up_front_and_corrected_at_the_end(limiter: Limiter) -> None:
    limits = limiter(key_tokens_per_minute=1000)
    first = await limits.admit("key", "account", 800)
    assert first.status.remaining_tokens == 200
    with pytest.raises(RateLimited):
        await limits.admit("key", "account", 300)

    await first.release(50)  # used far less than reserved: 750 come back
    second = await limits.admit("key", "account", 300)
    assert second.status.remaining_tokens == 1000 - 50 - 300
    await second.release(300)
    await second.release(0)  # releasing twice changes nothing
    assert (await limits.admit("key", "account", 0)).status.remaining_tokens == 650


async def test_a_reservation_larger_than_the_bucket_waits_for_a_full_one(
    limiter: Limiter, clock: Clock
) -> None:
    limits = limiter(key_tokens_per_minute=100)
    await (await limits.admit("key", "account", 5000)).release(100)
    with pytest.raises(RateLimited) as raised:
        await limits.admit("key", "account", 5000)
    assert raised.value.metadata["retry_after_s"] == "60"
    clock.now += 60
    await limits.admit("key", "account", 5000)


async def test_requests_in_flight_are_bounded(limiter: Limiter) -> None:
    limits = limiter(key_concurrent_requests=2)
    running = [await limits.admit("key", "account", 0) for _ in range(2)]
    with pytest.raises(RateLimited) as raised:
        await limits.admit("key", "account", 0)
    assert raised.value.metadata["retry_after_s"] == "1"
    await running[0].release(0)
    await limits.admit("key", "account", 0)


async def test_unlimited_by_default_and_no_headers(limiter: Limiter) -> None:
    limits = limiter()
    admissions = [await limits.admit("key", "account", 10**9) for _ in range(100)]
    assert admissions[-1].status.headers() == ()


async def test_headers_report_the_tighter_of_key_and_account(limiter: Limiter) -> None:
    limits = limiter(
        key_requests_per_minute=10, account_requests_per_minute=5, key_tokens_per_minute=100
    )
    status = (await limits.admit("key", "account", 30)).status
    assert dict(status.headers()) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        # A minute refills the whole limit: one request of 5 in 12 s, 30 tokens of 100 in 18.
        "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "70",
        "x-ratelimit-reset-tokens": "18s",
    }


async def test_reset_counts_down_as_the_buckets_refill(limiter: Limiter, clock: Clock) -> None:
    limits = limiter(key_requests_per_minute=600, key_tokens_per_minute=6000)
    await limits.admit("key", "account", 1500)
    clock.now += 5
    status = dict((await limits.admit("key", "account", 0)).status.headers())
    # Requests: full again after 5 s, one short after the second (100 ms at 10/s);
    # tokens: 1500 taken, 500 refilled, 1000 short (10 s at 100/s).
    assert status["x-ratelimit-reset-requests"] == "100ms"
    assert status["x-ratelimit-reset-tokens"] == "10s"
    clock.now += 600
    status = dict((await limits.admit("key", "account", 0)).status.headers())
    assert status["x-ratelimit-reset-tokens"] == "0s"


async def test_stored_limits_override_the_defaults_field_by_field(limiter: Limiter) -> None:
    limits = limiter(key_requests_per_minute=1, key_concurrent_requests=5)
    stored = RateLimits(requests_per_minute=2)
    for _ in range(2):
        await (await limits.admit("key", "account", 0, key_limits=stored)).release(0)
    with pytest.raises(RateLimited):
        await limits.admit("key", "account", 0, key_limits=stored)
    # The default concurrency still applies where the stored limits say nothing.
    concurrent = limiter(key_concurrent_requests=1)
    held = await concurrent.admit("key-2", "account", 0, key_limits=stored)
    with pytest.raises(RateLimited):
        await concurrent.admit("key-2", "account", 0, key_limits=stored)
    await held.release(0)


async def test_a_changed_limit_applies_and_requests_in_flight_still_count(
    limiter: Limiter,
) -> None:
    limits = limiter()
    one = RateLimits(concurrent_requests=1)
    first = await limits.admit("key", "account", 0, account_limits=one)
    with pytest.raises(RateLimited):
        await limits.admit("other-key", "account", 0, account_limits=one)
    # Raised while the first is still running: one more fits, not two.
    two = RateLimits(concurrent_requests=2)
    second = await limits.admit("other-key", "account", 0, account_limits=two)
    with pytest.raises(RateLimited):
        await limits.admit("third-key", "account", 0, account_limits=two)
    await first.release(0)
    await second.release(0)
    await limits.admit("key", "account", 0, account_limits=two)
    await limits.admit("key", "account", 0, account_limits=two)


async def test_replicas_on_the_same_counters_admit_the_limit_once(
    counters: LimitCounters, clock: Clock
) -> None:
    """Two limiters (two replicas) over one store: together they admit the limit."""
    settings = RateLimitSettings(key_requests_per_minute=4)
    replicas = [RateLimiter(settings, counters=counters, clock=clock) for _ in range(2)]
    admitted = 0
    for turn in range(10):
        try:
            await replicas[turn % 2].admit("key", "account", 0)
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 4


class _Recording:
    """Counters that record the scopes they were asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self._local = LocalCounters()

    async def acquire(
        self, lease: str, scopes: Sequence[Scope], tokens: int, now: float
    ) -> Verdict:
        self.asked += [scope.name for scope in scopes]
        return await self._local.acquire(lease, scopes, tokens, now)

    async def release(
        self, lease: str, scopes: Sequence[Scope], reserved: int, used: int, now: float
    ) -> None:
        self.asked += [scope.name for scope in scopes]
        await self._local.release(lease, scopes, reserved, used, now)


async def test_no_counters_are_kept_or_asked_for_callers_without_limits() -> None:
    recording = _Recording()
    limits = RateLimiter(
        RateLimitSettings(account_requests_per_minute=100), counters=recording, clock=Clock()
    )
    for index in range(3):
        await (await limits.admit(f"key-{index}", "account", 10)).release(10)
    assert set(recording.asked) == {"account:account"}


def test_stored_limits_must_be_positive() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_rate_limits(RateLimits(tokens_per_minute=0))
    assert raised.value.metadata["field"] == "rate_limits.tokens_per_minute"
    assert RateLimits(requests_per_minute=5).over(RateLimits(2, 3, 4)) == RateLimits(5, 3, 4)
