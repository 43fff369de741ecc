"""Console sessions in a real Redis: the backend's contract (two gateways, two
clients, one Redis), a malformed entry, and a Redis that does not answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from core.namespace import RedisNames
from gateway.console.sessions import SessionBackend, SessionsUnavailable
from gateway.console.sessions_redis import RedisSessions
from tests.console_sessions_contract import SessionBackendContract, sealed
from tests.harness import free_port


class TestRedisSessions(SessionBackendContract):
    @pytest.fixture
    async def backend(
        self, redis_url: str, redis_names: RedisNames
    ) -> AsyncIterator[SessionBackend]:
        sessions = RedisSessions.from_url(redis_url, redis_names)
        yield sessions
        await sessions.close()

    @pytest.fixture
    async def other_gateway(
        self, redis_url: str, redis_names: RedisNames
    ) -> AsyncIterator[SessionBackend]:
        sessions = RedisSessions.from_url(redis_url, redis_names)
        yield sessions
        await sessions.close()

    async def test_a_malformed_entry_is_no_session(
        self, redis_url: str, redis_names: RedisNames
    ) -> None:
        client = redis.Redis.from_url(redis_url)
        await client.set(redis_names.console_session("h1"), b"{not json")
        await client.aclose()
        sessions = RedisSessions.from_url(redis_url, redis_names)
        assert await sessions.get("h1") is None
        await sessions.close()


async def test_a_redis_that_does_not_answer_is_reported_as_such() -> None:
    sessions = RedisSessions.from_url(f"redis://127.0.0.1:{free_port()}/0", RedisNames())
    for call in (sessions.get("h1"), sessions.put("h1", sealed(), 60), sessions.delete("h1")):
        with pytest.raises(SessionsUnavailable):
            await call
    await sessions.close()
