"""API key authentication with a short-lived cache.

Every request authenticates; caching successful lookups for a few seconds keeps
the account service off the hot path. Failures are not cached, so a new key
works at once. A revoked key, a disabled account or changed account limits
reach the cache as an invalidation (server/common/invalidation.py) and drop
its entries at once; the TTL bounds how long a lost invalidation keeps one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from server.cloud.ports import AccountPort, Caller
from server.common.credentials import bearer_credential
from server.common.invalidation import Invalidation, Subject


class CachedAuthenticator:
    def __init__(self, account: AccountPort, *, ttl_s: float = 5.0, max_entries: int = 10_000):
        self._account = account
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        # Keyed by a digest so plaintext keys are not kept in memory.
        self._cache: dict[bytes, tuple[float, Caller]] = {}
        # Bumped by every invalidation: a lookup that overlapped one is not cached,
        # since its answer may predate the change.
        self._generation = 0

    async def authenticate(self, authorization: str | None) -> Caller:
        secret = bearer_credential(authorization)
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        generation = self._generation
        caller = await self._account.authenticate(secret)
        if generation != self._generation:
            return caller
        if len(self._cache) >= self._max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
        self._cache[digest] = (now + self._ttl_s, caller)
        return caller

    def invalidate(self, change: Invalidation) -> None:
        if change.subject is Subject.API_KEY:
            self._drop(lambda caller: caller.api_key_id == change.id)
        elif change.subject is Subject.ACCOUNT:
            self._drop(lambda caller: caller.account_id == change.id)

    def invalidate_all(self) -> None:
        self._generation += 1
        self._cache.clear()

    def _drop(self, stale: Callable[[Caller], bool]) -> None:
        # A scan: invalidations are rare next to lookups, and the cache is bounded.
        self._generation += 1
        self._cache = {k: v for k, v in self._cache.items() if not stale(v[1])}
