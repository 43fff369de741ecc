"""Rate limits with a hand-driven clock: no sleeping, no timing thresholds."""

from __future__ import annotations

import pytest

from core.errors import InvalidArgument, RateLimited
from server.cloud.rate_limits import RateLimiter
from server.cloud.settings import RateLimitSettings
from server.common.rate_limits import RateLimits, validate_rate_limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: Clock, **limits: int) -> RateLimiter:
    return RateLimiter(RateLimitSettings(**limits), clock=clock)


def test_a_burst_beyond_requests_per_minute_is_refused_with_when_to_retry() -> None:
    clock = Clock()
    limiter = _limiter(clock, key_requests_per_minute=3)
    for _ in range(3):
        limiter.admit("key", "account", 0).release(0)

    with pytest.raises(RateLimited) as raised:
        limiter.admit("key", "account", 0)

    # One request comes back every 20 s at 3 per minute.
    assert raised.value.metadata["retry_after_s"] == "20"
    assert raised.value.metadata["x-ratelimit-remaining-requests"] == "0"
    assert raised.value.metadata["x-ratelimit-limit-requests"] == "3"
    clock.now += 20
    limiter.admit("key", "account", 0)


def test_limits_are_per_key_and_per_account() -> None:
    clock = Clock()
    limiter = _limiter(clock, key_requests_per_minute=1, account_requests_per_minute=2)
    limiter.admit("key-1", "account", 0)
    with pytest.raises(RateLimited):
        limiter.admit("key-1", "account", 0)
    limiter.admit("key-2", "account", 0)  # another key of the same account
    with pytest.raises(RateLimited):
        limiter.admit("key-3", "account", 0)  # the account's two are used
    limiter.admit("key-4", "other-account", 0)


def test_tokens_are_reserved_up_front_and_corrected_at_the_end() -> None:
    clock = Clock()
    limiter = _limiter(clock, key_tokens_per_minute=1000)
    first = limiter.admit("key", "account", 800)
    assert first.status.remaining_tokens == 200
    with pytest.raises(RateLimited):
        limiter.admit("key", "account", 300)

    first.release(50)  # used far less than reserved: 750 come back
    second = limiter.admit("key", "account", 300)
    assert second.status.remaining_tokens == 1000 - 50 - 300
    second.release(300)
    second.release(0)  # releasing twice changes nothing
    assert limiter.admit("key", "account", 0).status.remaining_tokens == 650


def test_a_reservation_larger_than_the_bucket_waits_for_a_full_one() -> None:
    clock = Clock()
    limiter = _limiter(clock, key_tokens_per_minute=100)
    limiter.admit("key", "account", 5000).release(100)
    with pytest.raises(RateLimited) as raised:
        limiter.admit("key", "account", 5000)
    assert raised.value.metadata["retry_after_s"] == "60"
    clock.now += 60
    limiter.admit("key", "account", 5000)


def test_requests_in_flight_are_bounded() -> None:
    clock = Clock()
    limiter = _limiter(clock, key_concurrent_requests=2)
    running = [limiter.admit("key", "account", 0) for _ in range(2)]
    with pytest.raises(RateLimited) as raised:
        limiter.admit("key", "account", 0)
    assert raised.value.metadata["retry_after_s"] == "1"
    running[0].release(0)
    limiter.admit("key", "account", 0)


def test_unlimited_by_default_and_no_headers() -> None:
    limiter = RateLimiter(RateLimitSettings(), clock=Clock())
    admissions = [limiter.admit("key", "account", 10**9) for _ in range(1000)]
    assert admissions[-1].status.headers() == ()


def test_headers_report_the_tighter_of_key_and_account() -> None:
    limiter = _limiter(
        Clock(),
        key_requests_per_minute=10,
        account_requests_per_minute=5,
        key_tokens_per_minute=100,
    )
    status = limiter.admit("key", "account", 30).status
    assert dict(status.headers()) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "70",
    }


def test_no_state_is_kept_for_callers_without_limits() -> None:
    limiter = RateLimiter(RateLimitSettings(), clock=Clock())
    for index in range(100):
        limiter.admit(f"key-{index}", f"account-{index}", 10).release(10)
    assert limiter.tracked == 0


def test_stored_limits_override_the_defaults_field_by_field() -> None:
    clock = Clock()
    limiter = _limiter(clock, key_requests_per_minute=1, key_concurrent_requests=5)
    stored = RateLimits(requests_per_minute=2)
    for _ in range(2):
        limiter.admit("key", "account", 0, key_limits=stored).release(0)
    with pytest.raises(RateLimited):
        limiter.admit("key", "account", 0, key_limits=stored)
    # The default concurrency still applies where the stored limits say nothing.
    concurrent = _limiter(clock, key_concurrent_requests=1)
    held = concurrent.admit("key", "account", 0, key_limits=stored)
    with pytest.raises(RateLimited):
        concurrent.admit("key", "account", 0, key_limits=stored)
    held.release(0)


def test_a_changed_limit_applies_and_requests_in_flight_still_count() -> None:
    clock = Clock()
    limiter = _limiter(clock)
    one = RateLimits(concurrent_requests=1)
    first = limiter.admit("key", "account", 0, account_limits=one)
    with pytest.raises(RateLimited):
        limiter.admit("other-key", "account", 0, account_limits=one)
    # Raised while the first is still running: one more fits, not two.
    two = RateLimits(concurrent_requests=2)
    second = limiter.admit("other-key", "account", 0, account_limits=two)
    with pytest.raises(RateLimited):
        limiter.admit("third-key", "account", 0, account_limits=two)
    first.release(0)
    second.release(0)
    limiter.admit("key", "account", 0, account_limits=two)
    limiter.admit("key", "account", 0, account_limits=two)


def test_stored_limits_must_be_positive() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_rate_limits(RateLimits(tokens_per_minute=0))
    assert raised.value.metadata["field"] == "rate_limits.tokens_per_minute"
    assert RateLimits(requests_per_minute=5).over(RateLimits(2, 3, 4)) == RateLimits(5, 3, 4)
