"""Presence in a real Redis: the port's contract and Redis's handling of a malformed
record. Replicas sharing presence through Redis, as processes:
test_replica_failover.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from server.network.presence import Presence
from server.network.presence_redis import RedisPresence
from tests.presence_contract import PresenceContract, record


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own, its keys deleted afterwards."""
    prefix = f"resultity-test:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class TestRedisPresence(PresenceContract):
    @pytest.fixture
    async def presence(self, redis_url: str, prefix: str) -> AsyncIterator[Presence]:
        store = RedisPresence.from_url(redis_url, prefix=prefix)
        yield store
        await store.close()

    async def test_a_malformed_record_is_skipped(self, redis_url: str, prefix: str) -> None:
        client = redis.Redis.from_url(redis_url)
        store = RedisPresence(client, prefix=prefix)
        try:
            await store.publish([record("good")])
            await client.set(f"{prefix}:node:bad", b"{not json", px=30_000)
            await client.zadd(f"{prefix}:nodes", {"bad": int((time.time() + 30) * 1000)})
            assert [r.node_id for r in await store.snapshot()] == ["good"]
        finally:
            await store.close()
