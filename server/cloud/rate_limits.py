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
settings; a changed limit applies from the next request. The counters live in
this process's memory: with several cloud replicas each enforces the limits on
its own share (the scale-out work moves them to Redis).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from core.errors import RateLimited
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
    account's where those leave less."""

    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None

    def headers(self) -> tuple[tuple[str, str], ...]:
        values = {
            "x-ratelimit-limit-requests": self.limit_requests,
            "x-ratelimit-remaining-requests": self.remaining_requests,
            "x-ratelimit-limit-tokens": self.limit_tokens,
            "x-ratelimit-remaining-tokens": self.remaining_tokens,
        }
        return tuple((key, str(value)) for key, value in values.items() if value is not None)


class _Bucket:
    """Holds up to ``capacity``; refills ``capacity`` per 60 s."""

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self._level = float(capacity)
        self._at = now

    def level(self, now: float) -> float:
        rate = self.capacity / 60.0
        self._level = min(float(self.capacity), self._level + (now - self._at) * rate)
        self._at = now
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
class _Scope:
    limits: RateLimits
    requests: _Bucket | None
    tokens: _Bucket | None
    in_flight: int = 0


def _buckets(limits: RateLimits, now: float) -> tuple[_Bucket | None, _Bucket | None]:
    """Full buckets for the requests and tokens per minute that are limited."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    return (
        _Bucket(rpm, now) if rpm is not None else None,
        _Bucket(tpm, now) if tpm is not None else None,
    )


class Admission:
    """A request let in; ``release`` must be called once when it ends."""

    def __init__(
        self, limiter: RateLimiter, scopes: list[_Scope], reserved: int, status: RateStatus
    ) -> None:
        self._limiter = limiter
        self._scopes = scopes
        self._reserved = reserved
        self.status = status
        self._released = False

    def release(self, used_tokens: int) -> None:
        """Ends the request: tokens reserved but not used go back."""
        if self._released:
            return
        self._released = True
        self._limiter._release(self._scopes, self._reserved, used_tokens)


class RateLimiter:
    def __init__(
        self,
        settings: DefaultLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings: DefaultLimits = settings or FixedLimits()
        self._clock = clock
        self._scopes: dict[tuple[str, str], _Scope] = {}

    def _scope(self, kind: str, owner: str, limits: RateLimits, now: float) -> _Scope:
        if limits == NO_LIMITS:
            # Nothing to enforce: keep no state for this key or account.
            return _Scope(limits, None, None)
        scope = self._scopes.get((kind, owner))
        if scope is None:
            scope = _Scope(limits, *_buckets(limits, now))
            self._scopes[(kind, owner)] = scope
        elif scope.limits != limits:
            # Its stored limits changed: fresh buckets, updated in place so that
            # requests admitted under the old limits release into the same counts.
            scope.limits = limits
            scope.requests, scope.tokens = _buckets(limits, now)
        return scope

    @property
    def tracked(self) -> int:
        """Keys and accounts with counters (those that have limits)."""
        return len(self._scopes)

    def admit(
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
        now = self._clock()
        scopes = [
            self._scope("key", api_key_id, key_limits.over(self._settings.per_key), now),
            self._scope(
                "account", account_id, account_limits.over(self._settings.per_account), now
            ),
        ]
        wait_s = 0.0
        for scope in scopes:
            limit = scope.limits.concurrent_requests
            if limit is not None and scope.in_flight >= limit:
                raise RateLimited(
                    f"Too many requests in flight (limit {limit}); retry when one ends.",
                    retry_after_s=1,
                    headers=self._status(scopes, now).headers(),
                )
            if scope.requests is not None:
                wait_s = max(wait_s, scope.requests.wait_s(1, now))
            if scope.tokens is not None:
                wanted = min(tokens, scope.tokens.capacity)
                wait_s = max(wait_s, scope.tokens.wait_s(wanted, now))
        if wait_s > 0:
            raise RateLimited(
                "Rate limit reached for requests or tokens per minute.",
                retry_after_s=max(1, math.ceil(wait_s)),
                headers=self._status(scopes, now).headers(),
            )
        for scope in scopes:
            scope.in_flight += 1
            if scope.requests is not None:
                scope.requests.take(1)
            if scope.tokens is not None:
                scope.tokens.take(min(tokens, scope.tokens.capacity))
        return Admission(self, scopes, tokens, self._status(scopes, now))

    def _release(self, scopes: list[_Scope], reserved: int, used: int) -> None:
        now = self._clock()
        for scope in scopes:
            scope.in_flight -= 1
            if scope.tokens is not None:
                taken = min(reserved, scope.tokens.capacity)
                # Over-use (never beyond the hold) is taken too, so it counts.
                scope.tokens.give_back(taken - used, now)

    def _status(self, scopes: list[_Scope], now: float) -> RateStatus:
        def tightest(buckets: list[_Bucket | None]) -> tuple[int | None, int | None]:
            present = [(b.capacity, max(0, math.floor(b.level(now)))) for b in buckets if b]
            if not present:
                return None, None
            return min(present, key=lambda pair: pair[1])

        limit_requests, remaining_requests = tightest([s.requests for s in scopes])
        limit_tokens, remaining_tokens = tightest([s.tokens for s in scopes])
        return RateStatus(limit_requests, remaining_requests, limit_tokens, remaining_tokens)
