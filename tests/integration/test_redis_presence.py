"""Presence in a real Redis: the port's contract and Redis's handling of a malformed
record. Replicas sharing presence through Redis, as processes:
test_replica_failover.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from core.namespace import RedisNames
from server.network.presence import Presence
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
