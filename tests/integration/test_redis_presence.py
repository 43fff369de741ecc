"""Presence in a real Redis: the port's contract and Redis's handling of a malformed
record. Replicas sharing presence through Redis, as processes:
test_replica_failover.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from server.network.presence import Presence
from server.network.presence_redis import RedisPresence
from tests.presence_contract import PresenceContract, record


class TestRedisPresence(PresenceContract):
    @pytest.fixture
    async def presence(self, redis_url: str, redis_prefix: str) -> AsyncIterator[Presence]:
        store = RedisPresence.from_url(redis_url, prefix=redis_prefix)
        yield store
        await store.close()

    async def test_a_malformed_record_is_skipped(self, redis_url: str, redis_prefix: str) -> None:
        client = redis.Redis.from_url(redis_url)
        store = RedisPresence(client, prefix=redis_prefix)
        try:
            await store.publish([record("good")])
            await client.set(f"{redis_prefix}:node:bad", b"{not json", px=30_000)
            await client.zadd(f"{redis_prefix}:nodes", {"bad": int((time.time() + 30) * 1000)})
            assert [r.node_id for r in await store.snapshot()] == ["good"]
        finally:
            await store.close()
