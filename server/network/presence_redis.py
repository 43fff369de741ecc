"""Presence in Redis, shared by network replicas on several machines.

One string key per node holds its record as JSON and expires with its lease
(``PXAT``); a sorted set of node ids scored by expiry lists them without
scanning the keyspace. The change log is a sorted set of node ids scored by
the sequence number of each one's latest change (a record that is new or
differs in more than its lease, a withdrawal, a lapse), beside a hash of the
log's epoch, sequence and trimmed floor; a hash holds each replica's latest
lease. The compare-and-set of a re-homed node (the newer
session wins, a replica withdraws only its own records) runs in Lua, so it is
atomic. Redis is never the source of truth for anything that lasts: a lost
Redis loses who is where for one publish interval.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from core.namespace import RedisNames
from server.network.presence import (
    LOG_SLACK,
    NodePresence,
    PresenceChanges,
    PresenceCursor,
    PresenceUnavailable,
    ReplicaLease,
)

log = structlog.get_logger(__name__)

# Every script's ARGV begins with the index, change log, log state and leases
# keys, then an epoch for a log that begins here.
_PRELUDE = """
local index, changes, log, leases, epoch = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function log_change(node_id)
  redis.call('HSETNX', log, 'epoch', epoch)
  redis.call('ZADD', changes, redis.call('HINCRBY', log, 'seq', 1), node_id)
end
"""

# KEYS: record keys; ARGV: the prelude's, then (record JSON, expiry ms, lease) per key.
_PUBLISH = (
    _PRELUDE
    + """
-- Whether the new record differs from the old in its lease only (NodePresence.renews).
local function renews(new, old)
  for name, value in pairs(new) do
    if name ~= 'published_at' and name ~= 'expires_at' then
      local was = old[name]
      if type(value) == 'table' then
        if type(was) ~= 'table' or #value ~= #was then return false end
        for i = 1, #value do
          if value[i] ~= was[i] then return false end
        end
      elseif value ~= was then
        return false
      end
    end
  end
  for name in pairs(old) do
    if new[name] == nil then return false end
  end
  return true
end

for i, key in ipairs(KEYS) do
  local record = ARGV[3 * i + 3]
  local expires_ms = ARGV[3 * i + 4]
  local new = cjson.decode(record)
  redis.call('HSET', leases, new.replica_id, ARGV[3 * i + 5])
  local current = redis.call('GET', key)
  local old = current and cjson.decode(current)
  if not (old and old.replica_id ~= new.replica_id and old.connected_at > new.connected_at) then
    redis.call('SET', key, record, 'PXAT', expires_ms)
    redis.call('ZADD', index, expires_ms, new.node_id)
    if not (old and renews(new, old)) then log_change(new.node_id) end
  end
end
return 0
"""
)

# KEYS: record keys; ARGV: the prelude's, replica id, then the node id of each key.
_WITHDRAW = (
    _PRELUDE
    + """
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if current and cjson.decode(current).replica_id == ARGV[6] then
    redis.call('DEL', key)
    redis.call('ZREM', index, ARGV[6 + i])
    log_change(ARGV[6 + i])
  end
end
return 0
"""
)

# ARGV: the prelude's, the reader's epoch and seq ('' for none), LOG_SLACK.
# Returns the log's epoch and seq, 1 when the reader must read everything,
# the node ids to read (every live one, or those changed since its seq) and
# the live leases as field, value pairs. Lapsed records are logged as changes
# by Redis's own clock, the one their keys expire by, and only once their
# keys are gone (a key lives through its expiry millisecond).
_CHANGES = (
    _PRELUDE
    + """
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, node_id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. now_ms)) do
  redis.call('ZREM', index, node_id)
  log_change(node_id)
end
local lease_values = redis.call('HGETALL', leases)
local live_leases = {}
for i = 1, #lease_values, 2 do
  if tonumber(string.match(lease_values[i + 1], '^%S+')) * 1000 <= now_ms then
    redis.call('HDEL', leases, lease_values[i])
  else
    table.insert(live_leases, lease_values[i])
    table.insert(live_leases, lease_values[i + 1])
  end
end
local live = redis.call('ZCARD', index)
local logged = redis.call('ZCARD', changes)
if logged > 2 * live + tonumber(ARGV[8]) then
  local cut = logged - live
  local last = redis.call('ZRANGE', changes, cut - 1, cut - 1, 'WITHSCORES')
  redis.call('HSET', log, 'floor', last[2])
  redis.call('ZREMRANGEBYRANK', changes, 0, cut - 1)
end
redis.call('HSETNX', log, 'epoch', epoch)
local state = redis.call('HMGET', log, 'epoch', 'seq', 'floor')
local seq = tonumber(state[2]) or 0
local since = tonumber(ARGV[7])
local ids
local full = 0
if ARGV[6] ~= state[1] or since == nil or since < (tonumber(state[3]) or 0) then
  full = 1
  ids = redis.call('ZRANGE', index, 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', changes, '(' .. since, '+inf')
end
return {state[1], seq, full, ids, live_leases}
"""
)

# Records published per script call: bounds the time Redis spends in one script.
_BATCH = 500


class RedisPresence:
    def __init__(self, client: redis.Redis, names: RedisNames) -> None:
        self._client = client
        self._names = names
        # Index, change log, log state (epoch, seq, floor), leases; and the epoch
        # of a log this instance is the first to write.
        self._keys: list[str | int] = [
            names.presence_index,
            names.presence_changes,
            names.presence_log,
            names.presence_leases,
            uuid.uuid4().hex,
        ]
        self._publish = client.register_script(_PUBLISH)
        self._withdraw = client.register_script(_WITHDRAW)
        self._changes = client.register_script(_CHANGES)

    @classmethod
    def from_url(cls, url: str, names: RedisNames) -> RedisPresence:
        return cls(redis.Redis.from_url(url), names)

    def _key(self, node_id: str) -> str:
        return self._names.presence_record(node_id)

    async def publish(self, records: Sequence[NodePresence]) -> None:
        with _unavailable():
            for start in range(0, len(records), _BATCH):
                batch = records[start : start + _BATCH]
                args = list(self._keys)
                for record in batch:
                    lease = f"{record.expires_at!r} {record.published_at!r}"
                    args += [record.to_json(), int(record.expires_at * 1000), lease]
                await self._publish(keys=[self._key(r.node_id) for r in batch], args=args)

    async def withdraw(self, replica_id: str, node_ids: Sequence[str]) -> None:
        if not node_ids:
            return
        with _unavailable():
            await self._withdraw(
                keys=[self._key(n) for n in node_ids], args=[*self._keys, replica_id, *node_ids]
            )

    async def snapshot(self) -> list[NodePresence]:
        return (await self.changes(None)).records

    async def changes(self, since: PresenceCursor | None) -> PresenceChanges:
        reader = ("", "") if since is None else (since.epoch, since.seq)
        with _unavailable():
            epoch, seq, full, members, lease_values = await self._changes(
                args=[*self._keys, *reader, LOG_SLACK]
            )
            node_ids = [member.decode() for member in members]
            values = await self._client.mget([self._key(n) for n in node_ids]) if node_ids else []
        records, removed = [], []
        for node_id, value in zip(node_ids, values, strict=True):
            if value is None:
                removed.append(node_id)  # withdrawn or lapsed (or lapsed since the log was read)
                continue
            try:
                records.append(NodePresence.from_json(value))
            except (ValueError, TypeError, KeyError) as error:
                log.warning("malformed presence record skipped", node_id=node_id, error=str(error))
        leases = {
            replica.decode(): ReplicaLease(*map(float, value.split()))
            for replica, value in zip(lease_values[::2], lease_values[1::2], strict=True)
        }
        cursor = PresenceCursor(epoch.decode(), int(seq))
        return PresenceChanges(cursor, bool(full), records, [] if full else removed, leases)

    async def close(self) -> None:
        await self._client.aclose()


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as error:
        raise PresenceUnavailable(f"presence store unreachable: {error}") from error
