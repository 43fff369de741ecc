"""Presence in a real Redis: the port's contract, Redis's handling of a malformed
record, records of a replica of the previous version (a rolling upgrade) and
the sessions hash kept in step with the records. Replicas sharing presence
through Redis, as processes: test_replica_failover.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as redis

from core.namespace import RedisNames
from server.network.presence import NodePresence, Presence
from server.network.presence_redis import RedisPresence
from tests.presence_contract import PresenceContract, record


class TestRedisPresence(PresenceContract):
    @pytest.fixture
    async def presence(self, redis_url: str, redis_names: RedisNames) -> AsyncIterator[Presence]:
        store = RedisPresence.from_url(redis_url, redis_names)
        yield store
        await store.close()

    async def test_a_malformed_record_is_skipped(
        self, redis_url: str, redis_names: RedisNames
    ) -> None:
        client = redis.Redis.from_url(redis_url)
        store = RedisPresence(client, redis_names)
        try:
            await store.publish([record("good")])
            await client.set(redis_names.presence_record("bad"), b"{not json", px=30_000)
            expires_ms = int((time.time() + 30) * 1000)
            await client.zadd(redis_names.presence_index, {"bad": expires_ms})
            assert [r.node_id for r in await store.snapshot()] == ["good"]
        finally:
            await store.close()


async def _write_as_an_older_replica(
    client: redis.Redis, names: RedisNames, record: NodePresence
) -> None:
    """What a replica that predates the sessions hash writes: the record and its
    index entry only."""
    expires_ms = int(record.expires_at * 1000)
    await client.set(names.presence_record(record.node_id), record.to_json(), pxat=expires_ms)
    await client.zadd(names.presence_index, {record.node_id: expires_ms})


async def test_a_newer_session_an_older_replica_wrote_still_wins(
    redis_url: str, redis_names: RedisNames
) -> None:
    client = redis.Redis.from_url(redis_url)
    store = RedisPresence(client, redis_names)
    try:
        now = time.time()
        await store.publish([record("n1", "r1", connected_at=now - 60)])
        # The node re-homed to a replica of the previous version: the sessions
        # entry r1 wrote no longer describes the record.
        rehomed = record("n1", "r2", connected_at=now)
        await _write_as_an_older_replica(client, redis_names, rehomed)
        read = await store.changes(None)
        await store.publish([record("n1", "r1", connected_at=now - 60)])
        await store.withdraw("r1", ["n1"])
        assert await store.snapshot() == [rehomed]
        # Its own renewal of a record it did not write counts as a change once.
        renewal = replace(rehomed, published_at=now + 1, expires_at=now + 31)
        await store.publish([renewal])
        assert (await store.changes(read.cursor)).records == [renewal]
    finally:
        await store.close()


async def test_withdrawn_and_lapsed_records_leave_no_session_behind(
    redis_url: str, redis_names: RedisNames
) -> None:
    client = redis.Redis.from_url(redis_url)
    store = RedisPresence(client, redis_names)
    try:
        await store.publish([record("n1"), record("n2", lease_s=0.2), record("n3")])
        await store.withdraw("r1", ["n1"])
        await asyncio.sleep(0.4)
        await store.changes(None)
        assert await client.hkeys(redis_names.presence_sessions) == [b"n3"]
    finally:
        await store.close()
