"""Console sessions in Redis (RESULTITY_REDIS_URL), so that any gateway replica serves
any signed-in browser: no sticky sessions.

Each sealed session is one key (``RedisNames.console_session``) holding JSON, with Redis's own
expiry as its TTL. What is stored is what ``SessionStore`` seals: the API key only
encrypted under a key derived from the cookie, which Redis never sees.
"""

from __future__ import annotations

import base64
import json

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.namespace import RedisNames
from gateway.console.sessions import Identity, SealedSession, SessionsUnavailable

log = structlog.get_logger("gateway.console")

# A page waits this long for Redis, then says the console is unavailable.
TIMEOUT_S = 1.0


def _encode(sealed: SealedSession) -> bytes:
    identity = sealed.identity
    return json.dumps(
        {
            "account_id": identity.account_id,
            "account_name": identity.account_name,
            "admin": identity.admin,
            "key_prefix": identity.key_prefix,
            "sealed_key": base64.b64encode(sealed.sealed_key).decode(),
            "sealed_new_secret": base64.b64encode(sealed.sealed_new_secret).decode(),
            "csrf_token": sealed.csrf_token,
            "created_at": sealed.created_at,
            "last_seen_at": sealed.last_seen_at,
        }
    ).encode()


def _decode(raw: bytes | str) -> SealedSession:
    item = json.loads(raw)
    return SealedSession(
        Identity(item["account_id"], item["account_name"], item["admin"], item["key_prefix"]),
        base64.b64decode(item["sealed_key"]),
        base64.b64decode(item["sealed_new_secret"]),
        item["csrf_token"],
        float(item["created_at"]),
        float(item["last_seen_at"]),
    )


class RedisSessions:
    def __init__(self, client: Redis, names: RedisNames) -> None:
        self._client = client
        self._names = names

    @classmethod
    def from_url(cls, url: str, names: RedisNames) -> RedisSessions:
        client = Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        return cls(client, names)

    async def get(self, handle: str) -> SealedSession | None:
        try:
            raw = await self._client.get(self._names.console_session(handle))
        except (RedisError, OSError) as error:
            raise SessionsUnavailable(str(error)) from error
        if raw is None:
            return None
        try:
            return _decode(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("console.session_malformed")
            return None

    async def put(self, handle: str, sealed: SealedSession, ttl_s: float) -> None:
        try:
            await self._client.set(
                self._names.console_session(handle),
                _encode(sealed),
                px=max(1, int(ttl_s * 1000)),
            )
        except (RedisError, OSError) as error:
            raise SessionsUnavailable(str(error)) from error

    async def delete(self, handle: str) -> None:
        try:
            await self._client.delete(self._names.console_session(handle))
        except (RedisError, OSError) as error:
            raise SessionsUnavailable(str(error)) from error

    async def close(self) -> None:
        await self._client.aclose()
