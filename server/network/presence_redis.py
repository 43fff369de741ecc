"""Presence in Redis, shared by network replicas on several machines.

One string key per node holds its record as JSON and expires with its lease
(``PXAT``); a sorted set of node ids scored by expiry lists them without
scanning the keyspace. The compare-and-set of a re-homed node (the newer
session wins, a replica withdraws only its own records) runs in Lua, so it is
atomic. Redis is never the source of truth for anything that lasts: a lost
Redis loses who is where for one publish interval.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from server.network.presence import NodePresence, PresenceUnavailable

log = structlog.get_logger(__name__)

# KEYS: record keys; ARGV: index key, then (record JSON, expiry ms) per key.
_PUBLISH = """
local index = ARGV[1]
for i, key in ipairs(KEYS) do
  local record = ARGV[2 * i]
  local expires_ms = ARGV[2 * i + 1]
  local new = cjson.decode(record)
  local current = redis.call('GET', key)
  local keep = false
  if current then
    local old = cjson.decode(current)
    keep = old.replica_id ~= new.replica_id and old.connected_at > new.connected_at
  end
  if not keep then
    redis.call('SET', key, record, 'PXAT', expires_ms)
    redis.call('ZADD', index, expires_ms, new.node_id)
  end
end
return 0
"""

# KEYS: record keys; ARGV: index key, replica id, then the node id of each key.
_WITHDRAW = """
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if current and cjson.decode(current).replica_id == ARGV[2] then
    redis.call('DEL', key)
    redis.call('ZREM', ARGV[1], ARGV[2 + i])
  end
end
return 0
"""

# Records published per script call: bounds the time Redis spends in one script.
_BATCH = 500


class RedisPresence:
    def __init__(self, client: redis.Redis, *, prefix: str = "resultity:presence") -> None:
        self._client = client
        self._prefix = prefix
        self._index = f"{prefix}:nodes"
        self._publish = client.register_script(_PUBLISH)
        self._withdraw = client.register_script(_WITHDRAW)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "resultity:presence") -> RedisPresence:
        return cls(redis.Redis.from_url(url), prefix=prefix)

    def _key(self, node_id: str) -> str:
        return f"{self._prefix}:node:{node_id}"

    async def publish(self, records: Sequence[NodePresence]) -> None:
        with _unavailable():
            for start in range(0, len(records), _BATCH):
                batch = records[start : start + _BATCH]
                args: list[str | int] = [self._index]
                for record in batch:
                    args += [record.to_json(), int(record.expires_at * 1000)]
                await self._publish(keys=[self._key(r.node_id) for r in batch], args=args)

    async def withdraw(self, replica_id: str, node_ids: Sequence[str]) -> None:
        if not node_ids:
            return
        with _unavailable():
            await self._withdraw(
                keys=[self._key(n) for n in node_ids], args=[self._index, replica_id, *node_ids]
            )

    async def snapshot(self) -> list[NodePresence]:
        now = time.time()
        with _unavailable():
            await self._client.zremrangebyscore(self._index, "-inf", int(now * 1000))
            members: list[bytes] = await self._client.zrange(self._index, 0, -1)  # type: ignore[assignment]
            node_ids = [member.decode() for member in members]
            if not node_ids:
                return []
            values = await self._client.mget([self._key(n) for n in node_ids])
        records = []
        for value in values:
            if value is None:
                continue  # lapsed between the two reads
            try:
                record = NodePresence.from_json(value)
            except (ValueError, TypeError, KeyError) as error:
                log.warning("malformed presence record skipped", error=str(error))
                continue
            if record.expires_at > now:
                records.append(record)
        return records

    async def close(self) -> None:
        await self._client.aclose()


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as error:
        raise PresenceUnavailable(f"presence store unreachable: {error}") from error
