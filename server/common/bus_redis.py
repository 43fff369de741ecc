"""The fan-out bus over Redis pub/sub (bus.py): every replica that subscribes to a
channel gets what any replica publishes on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.asyncio.client import PubSub


class RedisSubscription:
    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for message in self._pubsub.listen():
            if message["type"] == "message":
                yield bytes(message["data"])

    async def close(self) -> None:
        await self._pubsub.aclose()


class RedisBus:
    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._client.publish(channel, message)

    async def subscribe(self, channel: str) -> RedisSubscription:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        return RedisSubscription(pubsub)

    async def close(self) -> None:
        await self._client.aclose()
