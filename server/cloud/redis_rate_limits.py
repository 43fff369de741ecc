"""Rate-limit counters in Redis, shared by every cloud replica.

A scope (one key or one account) is a hash holding its buckets' levels, the time
they were measured and the limits they were made for, and a sorted set of the
requests in flight scored by their lease's expiry. One Lua script decides on all
of a request's scopes and takes from all of them or none, so a limit of N per
minute admits N however many replicas ask. Leases are renewed while a request
runs; the slots of a replica that died free up when its leases expire.

``FallbackCounters`` is what cloud uses: the shared counters while Redis
answers, this replica's own (``LocalCounters``) while it does not (each replica
then enforces every limit on its own share), back to Redis once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence

import structlog
from redis.asyncio import Redis

from core.namespace import RedisNames
from server.cloud.rate_limits import Levels, LimitCounters, LocalCounters, Scope, Verdict
from server.common.redis_client import UNAVAILABLE

log = structlog.get_logger(__name__)

# KEYS: per scope, its bucket hash and its in-flight set.
# ARGV: now, lease, lease expiry, tokens; per scope rpm, tpm, in-flight limit (0: none).
# Returns: in-flight limit hit (0: none), wait in seconds, per scope the two levels.
_ACQUIRE = """
local now, lease = tonumber(ARGV[1]), ARGV[2]
local expiry, tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
local scopes, busy, wait = {}, 0, 0
for i = 1, #KEYS / 2 do
  local bucket, flight = KEYS[2 * i - 1], KEYS[2 * i]
  local rpm, tpm = tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  local limit = tonumber(ARGV[3 * i + 4])
  local made_for = rpm .. ':' .. tpm .. ':' .. limit
  local r, t = rpm, tpm
  local saved = redis.call('HMGET', bucket, 'limits', 'r', 't', 'at')
  if saved[1] == made_for then
    local elapsed = math.max(0, now - tonumber(saved[4]))
    r = math.min(rpm, tonumber(saved[2]) + elapsed * rpm / 60)
    t = math.min(tpm, tonumber(saved[3]) + elapsed * tpm / 60)
  end
  redis.call('ZREMRANGEBYSCORE', flight, '-inf', now)
  if busy == 0 and limit > 0 and redis.call('ZCARD', flight) >= limit then busy = limit end
  if rpm > 0 and r < 1 then wait = math.max(wait, (1 - r) * 60 / rpm) end
  local want = math.min(tokens, tpm)
  if tpm > 0 and t < want then wait = math.max(wait, (want - t) * 60 / tpm) end
  scopes[i] = {bucket, flight, made_for, r, t, want, tpm}
end
local result = {busy, tostring(wait)}
for i, s in ipairs(scopes) do
  local r, t = s[4], s[5]
  if busy == 0 and wait == 0 then
    r, t = r - 1, t - s[6]
    redis.call('ZADD', s[2], expiry, lease)
    redis.call('EXPIRE', s[2], math.ceil(expiry - now) + 1)
  end
  redis.call('HSET', s[1], 'limits', s[3], 'tpm', s[7], 'r', tostring(r), 't', tostring(t),
    'at', tostring(now))
  redis.call('EXPIRE', s[1], 120)
  result[#result + 1] = tostring(r)
  result[#result + 1] = tostring(t)
end
return result
"""

# KEYS: as for _ACQUIRE. ARGV: now, lease, then per scope the tokens to give back
# (taken minus used; negative: over-use, which counts too).
_RELEASE = """
local now, lease = tonumber(ARGV[1]), ARGV[2]
for i = 1, #KEYS / 2 do
  local bucket, flight = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('ZREM', flight, lease)
  local back = tonumber(ARGV[2 + i])
  local saved = redis.call('HMGET', bucket, 'tpm', 't', 'at')
  local tpm = tonumber(saved[1])
  if back ~= 0 and tpm and tpm > 0 then
    local elapsed = math.max(0, now - tonumber(saved[3]))
    local t = math.min(tpm, tonumber(saved[2]) + elapsed * tpm / 60 + back)
    redis.call('HSET', bucket, 't', tostring(t), 'at', tostring(now))
  end
end
return 0
"""

# KEYS: in-flight sets. ARGV: lease, new expiry, seconds until then. Extends a running
# request's lease (the sets' own expiry is relative: Redis's clock is not the callers').
_RENEW = """
for _, flight in ipairs(KEYS) do
  if redis.call('ZADD', flight, 'XX', 'CH', ARGV[2], ARGV[1]) == 1 then
    redis.call('EXPIRE', flight, math.ceil(tonumber(ARGV[3])) + 1)
  end
end
return 0
"""


def _limit(value: int | None) -> int:
    return 0 if value is None else value


class RedisCounters:
    """The counters in Redis. ``lease_s``: how long a request's slot outlives its
    replica; renewed every third of it while the request runs."""

    def __init__(
        self,
        redis: Redis,
        names: RedisNames,
        *,
        lease_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._names = names
        self._lease_s = lease_s
        self._clock = clock
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        # Requests admitted here and still running: lease -> their in-flight sets.
        self._running: dict[str, list[str]] = {}
        self._renewer: asyncio.Task[None] | None = None

    def _keys(self, scopes: Sequence[Scope]) -> list[str]:
        keys = []
        for scope in scopes:
            keys += [self._names.rate_bucket(scope.name), self._names.rate_in_flight(scope.name)]
        return keys

    async def acquire(
        self, lease: str, scopes: Sequence[Scope], tokens: int, now: float
    ) -> Verdict:
        args: list[str | int | float] = [repr(now), lease, repr(now + self._lease_s), tokens]
        for scope in scopes:
            limits = scope.limits
            args += [
                _limit(limits.requests_per_minute),
                _limit(limits.tokens_per_minute),
                _limit(limits.concurrent_requests),
            ]
        reply = await self._acquire(keys=self._keys(scopes), args=args)
        busy, wait_s = int(reply[0]), float(reply[1])
        levels = tuple(
            Levels(
                float(reply[2 + 2 * i]) if scope.limits.requests_per_minute else None,
                float(reply[3 + 2 * i]) if scope.limits.tokens_per_minute else None,
            )
            for i, scope in enumerate(scopes)
        )
        verdict = Verdict(levels, busy or None, wait_s)
        if verdict.admitted:
            self._running[lease] = self._keys(scopes)[1::2]
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew_leases(), name="rate-renew")
        return verdict

    async def release(
        self, lease: str, scopes: Sequence[Scope], reserved: int, used: int, now: float
    ) -> None:
        self._running.pop(lease, None)
        back = [scope.tokens_taken(reserved) - used for scope in scopes]
        await self._release(keys=self._keys(scopes), args=[repr(now), lease, *back])

    async def renew(self) -> None:
        """Extends the leases of the requests admitted here that still run."""
        expiry = self._clock() + self._lease_s
        for lease, flights in list(self._running.items()):
            await self._renew(keys=flights, args=[lease, repr(expiry), self._lease_s])

    async def _renew_leases(self) -> None:
        while self._running:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self.renew()
            except UNAVAILABLE as error:
                log.warning("renewing rate-limit leases failed", error=str(error))

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer


class FallbackCounters:
    """``shared`` while it answers; after a failure ``local`` for ``retry_s``, then
    ``shared`` again. A request is released where it was admitted."""

    def __init__(
        self,
        shared: LimitCounters,
        local: LocalCounters | None = None,
        *,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = shared
        self._local = local or LocalCounters()
        self._retry_s = retry_s
        self._clock = clock
        self._down_until = -math.inf
        self._down = False
        self._admitted_locally: set[str] = set()

    async def acquire(
        self, lease: str, scopes: Sequence[Scope], tokens: int, now: float
    ) -> Verdict:
        if self._clock() >= self._down_until:
            try:
                verdict = await self._shared.acquire(lease, scopes, tokens, now)
            except UNAVAILABLE as error:
                if not self._down:
                    log.warning(
                        "shared rate-limit counters unavailable; this replica counts alone",
                        error=str(error),
                    )
                self._down = True
                self._down_until = self._clock() + self._retry_s
            else:
                if self._down:
                    log.info("shared rate-limit counters are back")
                    self._down = False
                return verdict
        verdict = await self._local.acquire(lease, scopes, tokens, now)
        if verdict.admitted:
            self._admitted_locally.add(lease)
        return verdict

    async def release(
        self, lease: str, scopes: Sequence[Scope], reserved: int, used: int, now: float
    ) -> None:
        if lease in self._admitted_locally:
            self._admitted_locally.discard(lease)
            await self._local.release(lease, scopes, reserved, used, now)
            return
        try:
            await self._shared.release(lease, scopes, reserved, used, now)
        except UNAVAILABLE as error:
            # Its slot frees when its lease expires; unused tokens stay taken.
            log.warning("releasing shared rate-limit counters failed", error=str(error))
