"""Rate limits per API key and per account: requests and tokens per minute, and
requests in flight.

Each per-minute limit is a token bucket that holds at most one minute's worth
and refills continuously, so a caller may burst up to the limit and then goes
at the limit's pace. A request reserves its worst case of tokens (prompt bound
plus max_tokens) when admitted; when it ends, what it did not use goes back
(corrected at settlement). A reservation larger than a whole minute's worth is
capped at the bucket's size, so such a request waits for a full bucket rather
than being refused forever.

Limits stored with a key or an account (the account layer returns them when
the key authenticates) take precedence, field by field, over the defaults from
settings; a changed limit applies from the next request.

The counters sit behind a port (``LimitCounters``): ``LocalCounters`` keeps them
in this process (one replica), the Redis adapter
(server/cloud/redis_rate_limits.py) keeps them where every cloud replica
decides on the same state, each decision one atomic step.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.errors import RateLimited
from core.metadata import (
    LIMIT_REQUESTS,
    LIMIT_TOKENS,
    REMAINING_REQUESTS,
    REMAINING_TOKENS,
    RESET_REQUESTS,
    RESET_TOKENS,
)
from core.metrics import NO_COUNTER, Counter
from server.common.rate_limits import NO_LIMITS, RateLimits


class DefaultLimits(Protocol):
    """The limits every key and every account gets unless stored ones replace them
    (server/cloud/settings.py reads them from the environment)."""

    @property
    def per_key(self) -> RateLimits: ...

    @property
    def per_account(self) -> RateLimits: ...


@dataclass(frozen=True, slots=True)
class FixedLimits:
    per_key: RateLimits = NO_LIMITS
    per_account: RateLimits = NO_LIMITS


@dataclass(frozen=True, slots=True)
class RateStatus:
    """What the x-ratelimit-* response headers report: the key's limits, or the
    account's where those leave less; ``reset_*_s``: seconds until that bucket is
    full again."""

    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None

    def headers(self) -> tuple[tuple[str, str], ...]:
        values = {
            LIMIT_REQUESTS: self.limit_requests,
            REMAINING_REQUESTS: self.remaining_requests,
            RESET_REQUESTS: _duration(self.reset_requests_s),
            LIMIT_TOKENS: self.limit_tokens,
            REMAINING_TOKENS: self.remaining_tokens,
            RESET_TOKENS: _duration(self.reset_tokens_s),
        }
        return tuple((key, str(value)) for key, value in values.items() if value is not None)


def _duration(seconds: float | None) -> str | None:
    """A duration as OpenAI's reset headers write it: "20ms", "1.5s", "6m0s"."""
    if seconds is None:
        return None
    if seconds < 1:
        return f"{round(seconds * 1000)}ms" if seconds > 0 else "0s"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


@dataclass(frozen=True, slots=True)
class Scope:
    """One key's or one account's counters (``name``), under its resolved limits."""

    name: str
    limits: RateLimits

    def tokens_taken(self, reserved: int) -> int:
        """What a reservation takes from this scope's tokens bucket (capped at its size)."""
        capacity = self.limits.tokens_per_minute
        return 0 if capacity is None else min(reserved, capacity)


@dataclass(frozen=True, slots=True)
class Levels:
    """What a scope's buckets hold after a decision (None: not limited)."""

    requests: float | None
    tokens: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision on all scopes of a request: admitted (all taken), or refused (nothing
    taken) because one scope has ``in_flight_limit`` requests running, or because a
    bucket refills enough only in ``wait_s``."""

    levels: tuple[Levels, ...]
    in_flight_limit: int | None = None
    wait_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.in_flight_limit is None and self.wait_s <= 0


class LimitCounters(Protocol):
    """Where the buckets and in-flight counts live. ``acquire`` decides on every scope
    at once and takes one request and ``tokens`` (each scope's ``tokens_taken``) from
    all of them, or nothing; ``lease`` names the request until ``release``, which
    returns what was taken but not ``used``. ``now``: seconds on a clock every replica
    shares (wall time)."""

    async def acquire(
        self, lease: str, scopes: Sequence[Scope], tokens: int, now: float
    ) -> Verdict: ...

    async def release(
        self, lease: str, scopes: Sequence[Scope], reserved: int, used: int, now: float
    ) -> None: ...


class Bucket:
    """Holds up to ``capacity``; refills ``capacity`` per 60 s."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self._level = float(capacity)
        self._at = now

    def level(self, now: float) -> float:
        rate = self.capacity / 60.0
        # A clock that stepped back refills nothing.
        self._level = min(float(self.capacity), self._level + max(0.0, now - self._at) * rate)
        self._at = max(self._at, now)
        return self._level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0: now)."""
        missing = amount - self.level(now)
        return 0.0 if missing <= 0 else missing / (self.capacity / 60.0)

    def take(self, amount: float) -> None:
        self._level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self._level = min(float(self.capacity), self.level(now) + amount)


@dataclass
class _Counts:
    limits: RateLimits
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0


def _buckets(limits: RateLimits, now: float) -> tuple[Bucket | None, Bucket | None]:
    """Full buckets for the requests and tokens per minute that are limited."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    return (
        Bucket(rpm, now) if rpm is not None else None,
        Bucket(tpm, now) if tpm is not None else None,
    )


class LocalCounters:
    """The counters in this process's memory: exact for one replica."""

    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}

    def _for(self, scope: Scope, now: float) -> _Counts:
        counts = self._counts.get(scope.name)
        if counts is None:
            counts = _Counts(scope.limits, *_buckets(scope.limits, now))
            self._counts[scope.name] = counts
        elif counts.limits != scope.limits:
            # Its stored limits changed: fresh buckets, updated in place so that
            # requests admitted under the old limits release into the same counts.
            counts.limits = scope.limits
            counts.requests, counts.tokens = _buckets(scope.limits, now)
        return counts

    async def acquire(
        self, lease: str, scopes: Sequence[Scope], tokens: int, now: float
    ) -> Verdict:
        all_counts = [self._for(scope, now) for scope in scopes]
        in_flight_limit: int | None = None
        wait_s = 0.0
        for scope, counts in zip(scopes, all_counts, strict=True):
            limit = scope.limits.concurrent_requests
            if in_flight_limit is None and limit is not None and counts.in_flight >= limit:
                in_flight_limit = limit
            if counts.requests is not None:
                wait_s = max(wait_s, counts.requests.wait_s(1, now))
            if counts.tokens is not None:
                wait_s = max(wait_s, counts.tokens.wait_s(scope.tokens_taken(tokens), now))
        verdict = Verdict((), in_flight_limit, wait_s)
        if verdict.admitted:
            for scope, counts in zip(scopes, all_counts, strict=True):
                counts.in_flight += 1
                if counts.requests is not None:
                    counts.requests.take(1)
                if counts.tokens is not None:
                    counts.tokens.take(scope.tokens_taken(tokens))
        levels = tuple(
            Levels(
                None if c.requests is None else c.requests.level(now),
                None if c.tokens is None else c.tokens.level(now),
            )
            for c in all_counts
        )
        return Verdict(levels, in_flight_limit, wait_s)

    async def release(
        self, lease: str, scopes: Sequence[Scope], reserved: int, used: int, now: float
    ) -> None:
        for scope in scopes:
            counts = self._counts[scope.name]
            counts.in_flight -= 1
            if counts.tokens is not None:
                # Over-use (never beyond the hold) is taken too, so it counts.
                counts.tokens.give_back(scope.tokens_taken(reserved) - used, now)


class Admission:
    """A request let in; ``release`` must be called once when it ends."""

    def __init__(
        self,
        counters: LimitCounters,
        clock: Callable[[], float],
        lease: str,
        scopes: list[Scope],
        reserved: int,
        status: RateStatus,
    ) -> None:
        self._counters = counters
        self._clock = clock
        self._lease = lease
        self._scopes = scopes
        self._reserved = reserved
        self.status = status
        self._released = False

    async def release(self, used_tokens: int) -> None:
        """Ends the request: tokens reserved but not used go back."""
        if self._released or not self._scopes:
            return
        self._released = True
        await self._counters.release(
            self._lease, self._scopes, self._reserved, used_tokens, self._clock()
        )


class RateLimiter:
    def __init__(
        self,
        settings: DefaultLimits | None = None,
        *,
        counters: LimitCounters | None = None,
        clock: Callable[[], float] = time.time,
        rejections: Counter = NO_COUNTER,
    ) -> None:
        """``counters`` unset: this process's own (one replica). ``rejections``
        counts refused requests by the limit that refused them."""
        self._rejections = rejections
        self._settings: DefaultLimits = settings or FixedLimits()
        self._counters: LimitCounters = counters or LocalCounters()
        self._clock = clock

    async def admit(
        self,
        api_key_id: str,
        account_id: str,
        tokens: int,
        *,
        key_limits: RateLimits = NO_LIMITS,
        account_limits: RateLimits = NO_LIMITS,
    ) -> Admission:
        """Lets the request in, taking one request and ``tokens`` from the key's and
        the account's budgets, or raises RateLimited with how long to wait.
        ``key_limits``/``account_limits``: those stored, over the settings' defaults."""
        candidates = [
            Scope(f"key:{api_key_id}", key_limits.over(self._settings.per_key)),
            Scope(f"account:{account_id}", account_limits.over(self._settings.per_account)),
        ]
        # Nothing to enforce for a scope without limits: no counters are kept for it.
        scopes = [scope for scope in candidates if scope.limits != NO_LIMITS]
        lease = uuid.uuid4().hex
        if not scopes:
            return Admission(self._counters, self._clock, lease, [], tokens, _status([], []))
        verdict = await self._counters.acquire(lease, scopes, tokens, self._clock())
        status = _status(scopes, verdict.levels)
        if verdict.in_flight_limit is not None:
            self._rejections.inc("concurrent_requests")
            raise RateLimited(
                f"Too many requests in flight (limit {verdict.in_flight_limit}); "
                "retry when one ends.",
                retry_after_s=1,
                headers=status.headers(),
            )
        if not verdict.admitted:
            self._rejections.inc("per_minute")
            raise RateLimited(
                "Rate limit reached for requests or tokens per minute.",
                retry_after_s=max(1, math.ceil(verdict.wait_s)),
                headers=status.headers(),
            )
        return Admission(self._counters, self._clock, lease, scopes, tokens, status)


def _status(scopes: Sequence[Scope], levels: Sequence[Levels]) -> RateStatus:
    """The tighter state of the scopes' buckets (the one with less left)."""

    def tightest(
        present: list[tuple[int, int, float]],
    ) -> tuple[int | None, int | None, float | None]:
        if not present:
            return None, None, None
        limit, left, reset_s = min(present, key=lambda state: state[1])
        return limit, left, reset_s

    def state(capacity: int, level: float) -> tuple[int, int, float]:
        """Limit, what is left, and seconds until the bucket refills to its limit."""
        return capacity, max(0, math.floor(level)), max(0.0, capacity - level) * 60 / capacity

    requests, tokens = [], []
    for scope, level in zip(scopes, levels, strict=True):
        rpm, tpm = scope.limits.requests_per_minute, scope.limits.tokens_per_minute
        if rpm is not None and level.requests is not None:
            requests.append(state(rpm, level.requests))
        if tpm is not None and level.tokens is not None:
            tokens.append(state(tpm, level.tokens))
    limit_requests, remaining_requests, reset_requests = tightest(requests)
    limit_tokens, remaining_tokens, reset_tokens = tightest(tokens)
    return RateStatus(
        limit_requests,
        remaining_requests,
        limit_tokens,
        remaining_tokens,
        reset_requests,
        reset_tokens,
    )
