"""Conversions between the RateLimits proto and the domain shape."""

from __future__ import annotations

from resultity.account.v1 import rate_limits_pb2 as pb

from server.common.rate_limits import RateLimits


def rate_limits_to_pb(limits: RateLimits) -> pb.RateLimits:
    # None leaves an optional field unset.
    return pb.RateLimits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        concurrent_requests=limits.concurrent_requests,
    )


def rate_limits_from_pb(message: pb.RateLimits) -> RateLimits:
    """Unset fields stay unset (an explicit 0 is kept, to be refused as invalid)."""
    return RateLimits(
        message.requests_per_minute if message.HasField("requests_per_minute") else None,
        message.tokens_per_minute if message.HasField("tokens_per_minute") else None,
        message.concurrent_requests if message.HasField("concurrent_requests") else None,
    )
