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

Every replica renews every record each interval, so a renewal must cost Redis
little: a sessions hash holds per node the expiry, connected_at, content
digest (NodePresence.content_digest) and replica id its record was written
with, and the scripts compare those strings instead of decoding records. A
record written by a replica that predates the hash (a rolling upgrade) has no
entry, or a stale one its expiry no longer matches: that record is decoded
for the compare-and-set and the publish counts as a change (a change may be
reported again). An entry outliving its record (lapsed, or withdrawn by such
a replica) is ignored, the record being gone, and replaced at the node's next
publish; the log's reader removes the entries of the lapses it logs, a
withdrawal its own. The record JSON is the same for replicas of either version.
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

# Every script's ARGV begins with the index, change log, log state, leases and
# sessions keys, then an epoch for a log that begins here.
_PRELUDE = """
local index, changes, log, leases, sessions, epoch = unpack(ARGV, 1, 6)
local function log_change(node_id)
  redis.call('HSETNX', log, 'epoch', epoch)
  redis.call('ZADD', changes, redis.call('HINCRBY', log, 'seq', 1), node_id)
end
-- Who holds the node's live record: its replica id and connected_at, and the
-- session ('connected_at digest replica_id') when this version wrote it; nil
-- when the record is gone. The sessions entry is trusted only while the index
-- still scores the node by the expiry written with it: a record written since
-- by a replica that predates the sessions hash (a rolling upgrade) moved the
-- score, and then the record itself is decoded.
local function holder(key, node_id)
  if redis.call('EXISTS', key) == 0 then return nil end
  local entry = redis.call('HGET', sessions, node_id)
  if entry then
    local expires_ms, session = string.match(entry, '^(%d+) (.*)$')
    if tonumber(expires_ms) == tonumber(redis.call('ZSCORE', index, node_id)) then
      local connected_at, replica_id = string.match(session, '^(%S+) %S+ (.*)$')
      return replica_id, tonumber(connected_at), session
    end
  end
  local old = cjson.decode(redis.call('GET', key))
  return old.replica_id, old.connected_at, nil
end
"""

# KEYS: record keys; ARGV: the prelude's, then each replica's lease as
# (replica id, lease) pairs after their count, then per key its node id,
# replica id, connected_at, content digest, record JSON and expiry ms.
# A record is a renewal (no change) when its session is the one held.
_PUBLISH = (
    _PRELUDE
    + """
local replicas = tonumber(ARGV[7])
redis.call('HSET', leases, unpack(ARGV, 8, 7 + 2 * replicas))
local base = 7 + 2 * replicas
for i, key in ipairs(KEYS) do
  local at = base + 6 * (i - 1)
  local node_id, replica_id, connected_at = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local expires_ms = ARGV[at + 6]
  local session = connected_at .. ' ' .. ARGV[at + 4] .. ' ' .. replica_id
  local held_by, held_since, held = holder(key, node_id)
  if held_by == nil or held_by == replica_id or held_since <= tonumber(connected_at) then
    redis.call('SET', key, ARGV[at + 5], 'PXAT', expires_ms)
    redis.call('ZADD', index, expires_ms, node_id)
    redis.call('HSET', sessions, node_id, expires_ms .. ' ' .. session)
    if held ~= session then log_change(node_id) end
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
  local node_id = ARGV[7 + i]
  if holder(key, node_id) == ARGV[7] then
    redis.call('DEL', key)
    redis.call('ZREM', index, node_id)
    redis.call('HDEL', sessions, node_id)
    log_change(node_id)
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
  redis.call('HDEL', sessions, node_id)
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
if logged > 2 * live + tonumber(ARGV[9]) then
  local cut = logged - live
  local last = redis.call('ZRANGE', changes, cut - 1, cut - 1, 'WITHSCORES')
  redis.call('HSET', log, 'floor', last[2])
  redis.call('ZREMRANGEBYRANK', changes, 0, cut - 1)
end
redis.call('HSETNX', log, 'epoch', epoch)
local state = redis.call('HMGET', log, 'epoch', 'seq', 'floor')
local seq = tonumber(state[2]) or 0
local since = tonumber(ARGV[8])
local ids
local full = 0
if ARGV[7] ~= state[1] or since == nil or since < (tonumber(state[3]) or 0) then
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
        # Index, change log, log state (epoch, seq, floor), leases, sessions; and
        # the epoch of a log this instance is the first to write.
        self._keys: list[str | int] = [
            names.presence_index,
            names.presence_changes,
            names.presence_log,
            names.presence_leases,
            names.presence_sessions,
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
                # Each replica's lease is its last record's in the batch, set once.
                leases = {r.replica_id: f"{r.expires_at!r} {r.published_at!r}" for r in batch}
                args: list[str | int | float] = [*self._keys, len(leases)]
                for replica_lease in leases.items():
                    args += replica_lease
                for r in batch:
                    args += [
                        r.node_id,
                        r.replica_id,
                        repr(r.connected_at),
                        r.content_digest(),
                        r.to_json(),
                        int(r.expires_at * 1000),
                    ]
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
