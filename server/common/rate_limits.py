"""Inference rate limits, as stored with keys and accounts and as enforced."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import InvalidArgument

# Stored as PostgreSQL integers.
MAX_LIMIT = 2**31 - 1


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests and tokens per minute, requests in flight.

    A None field is not set: stored with a key or an account, the platform's
    default applies; once resolved against the defaults, no limit.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None

    def over(self, defaults: RateLimits) -> RateLimits:
        """These limits, with ``defaults`` where these are unset."""
        return RateLimits(
            _first(self.requests_per_minute, defaults.requests_per_minute),
            _first(self.tokens_per_minute, defaults.tokens_per_minute),
            _first(self.concurrent_requests, defaults.concurrent_requests),
        )


# Nothing stored (defaults apply) or, once resolved, no limit at all.
NO_LIMITS = RateLimits()


def validate_rate_limits(limits: RateLimits, *, field: str = "rate_limits") -> RateLimits:
    for name in ("requests_per_minute", "tokens_per_minute", "concurrent_requests"):
        value = getattr(limits, name)
        if value is not None and not 0 < value <= MAX_LIMIT:
            raise InvalidArgument(
                f"{field}.{name} must be between 1 and {MAX_LIMIT}", field=f"{field}.{name}"
            )
    return limits


def _first(value: int | None, default: int | None) -> int | None:
    return default if value is None else value
