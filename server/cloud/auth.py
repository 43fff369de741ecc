"""API key authentication with a short-lived cache.

Every request authenticates; caching successful lookups for a few seconds keeps
the account service off the hot path while a revoked key still stops working
within the TTL. Failures are not cached, so a new key works at once.
"""

from __future__ import annotations

import hashlib
import time

from server.cloud.ports import AccountPort, Caller
from server.common.credentials import bearer_credential


class CachedAuthenticator:
    def __init__(self, account: AccountPort, *, ttl_s: float = 5.0, max_entries: int = 10_000):
        self._account = account
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        # Keyed by a digest so plaintext keys are not kept in memory.
        self._cache: dict[bytes, tuple[float, Caller]] = {}

    async def authenticate(self, authorization: str | None) -> Caller:
        secret = bearer_credential(authorization)
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        caller = await self._account.authenticate(secret)
        if len(self._cache) >= self._max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
        self._cache[digest] = (now + self._ttl_s, caller)
        return caller
