"""Two deployments on the real Redis and RabbitMQ, each in a namespace of its own
(core/namespace.py): neither sees the other's presence, rate-limit counters or
console sessions, hears its announcements, or consumes its settlements or ledger
events. The bus's contract is in tests/namespace_contract.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as redis

from core.errors import RateLimited
from core.namespace import AmqpNames, RedisNames
from gateway.console.sessions_redis import RedisSessions
from server.account.ledger_events import USAGE_SETTLED, LedgerEvent
from server.account.ledger_events_amqp import AmqpLedgerEvents
from server.account.usage import CONSUMER
from server.cloud.rate_limits import RateLimiter
from server.cloud.redis_rate_limits import RedisCounters
from server.cloud.settings import RateLimitSettings
from server.common.bus import Bus
from server.common.bus_redis import RedisBus
from server.common.settlement_amqp import AmqpSettlementQueue
from server.common.settlements import Settlement, SettlementHandler
from server.network.presence_redis import RedisPresence
from tests.console_sessions_contract import sealed
from tests.harness import eventually
from tests.namespace_contract import *  # noqa: F403
from tests.namespaces import forget_amqp, forget_redis, new_namespace
from tests.presence_contract import record
from tests.settlement_queue_contract import SETTLEMENT

OTHER = Settlement("5f0c7c1e-0000-4000-8000-0000000000ff", 1)


@pytest.fixture
async def bus(redis_url: str) -> AsyncIterator[Bus]:
    redis_bus = RedisBus(redis_url)
    yield redis_bus
    await redis_bus.close()


@pytest.fixture
async def other_namespace(redis_url: str, amqp_url: str) -> AsyncIterator[str]:
    """A second deployment's namespace beside the test's own, removed afterwards."""
    namespace = new_namespace()
    yield namespace
    await forget_redis(redis_url, namespace)
    await forget_amqp(amqp_url, AmqpNames(namespace))


async def test_presence_of_one_namespace_is_not_anothers(
    redis_url: str, redis_names: RedisNames, other_namespace: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    ours, theirs = (
        RedisPresence(client, redis_names),
        RedisPresence(client, RedisNames(other_namespace)),
    )
    try:
        await ours.publish([record("n1", "r1")])
        await theirs.withdraw("r1", ["n1"])  # a replica of theirs of the same id
        assert await theirs.snapshot() == []
        assert [r.node_id for r in await ours.snapshot()] == ["n1"]
    finally:
        await client.aclose()


async def test_rate_limit_counters_of_one_namespace_are_not_anothers(
    redis_url: str, redis_names: RedisNames, other_namespace: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    counters = [
        RedisCounters(client, names) for names in (redis_names, RedisNames(other_namespace))
    ]
    one_at_a_time = RateLimitSettings(key_concurrent_requests=1)
    ours, theirs = (RateLimiter(one_at_a_time, counters=c) for c in counters)
    try:
        await ours.admit("key", "account", 0)
        await theirs.admit("key", "account", 0)  # the same key id: their own slot
        with pytest.raises(RateLimited):
            await ours.admit("key", "account", 0)
    finally:
        for each in counters:
            await each.close()
        await client.aclose()


async def test_console_sessions_of_one_namespace_are_not_anothers(
    redis_url: str, redis_names: RedisNames, other_namespace: str
) -> None:
    ours = RedisSessions.from_url(redis_url, redis_names)
    theirs = RedisSessions.from_url(redis_url, RedisNames(other_namespace))
    try:
        await ours.put("h1", sealed(), 60)
        assert await theirs.get("h1") is None
        await theirs.delete("h1")
        assert await ours.get("h1") is not None
    finally:
        await ours.close()
        await theirs.close()


async def test_settlements_of_one_namespace_reach_only_its_consumer(
    amqp_url: str, amqp_names: AmqpNames, other_namespace: str
) -> None:
    """Their consumer is there first and takes what reaches its queue, in order: it
    takes their own settlement and nothing before it."""
    ours = AmqpSettlementQueue(amqp_url, amqp_names, retry_s=0.05)
    theirs = AmqpSettlementQueue(amqp_url, AmqpNames(other_namespace), retry_s=0.05)
    received: dict[str, list[Settlement]] = {"ours": [], "theirs": []}

    def into(side: str) -> SettlementHandler:
        async def handler(settlement: Settlement) -> None:
            received[side].append(settlement)

        return handler

    try:
        await theirs.consume(into("theirs"))
        await ours.publish(SETTLEMENT)
        await theirs.publish(OTHER)
        await eventually(lambda: bool(received["theirs"]), timeout_s=20)
        assert received["theirs"] == [OTHER]
        assert await ours.pending() == 1
        await ours.consume(into("ours"))
        await eventually(lambda: bool(received["ours"]), timeout_s=20)
        assert received == {"ours": [SETTLEMENT], "theirs": [OTHER]}
    finally:
        await ours.close()
        await theirs.close()


async def test_ledger_events_of_one_namespace_reach_only_its_consumers(
    amqp_url: str, amqp_names: AmqpNames, other_namespace: str
) -> None:
    """The same consumer in both namespaces: theirs gets their own event alone,
    though ours was published first, with their queue bound already."""
    ours, theirs = (
        AmqpLedgerEvents(amqp_url, amqp_names),
        AmqpLedgerEvents(amqp_url, AmqpNames(other_namespace)),
    )
    received: list[LedgerEvent] = []

    async def handler(event: LedgerEvent) -> None:
        received.append(event)

    def event() -> LedgerEvent:
        return LedgerEvent(uuid.uuid4(), USAGE_SETTLED, {}, datetime.now(UTC))

    ours_event, theirs_event = event(), event()
    try:
        await theirs.subscribe(USAGE_SETTLED, CONSUMER, handler)
        await theirs.publish([])  # binds their consumer's queue
        await ours.publish([ours_event])
        await theirs.publish([theirs_event])
        await eventually(lambda: bool(received), timeout_s=20)
        assert [e.event_id for e in received] == [theirs_event.event_id]
    finally:
        await ours.close()
        await theirs.close()
