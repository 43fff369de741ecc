"""Redis stopped mid-load and started again, under two cloud replicas: requests go
on being served (each replica counts rate limits alone meanwhile), nothing is
charged twice or left held, and once Redis is back the replicas share their
counters and hear invalidations again. The Redis here is a server of this test's
own, so stopping it disturbs no other test."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio
from resultity.account.v1 import rate_limits_pb2 as rate_limits_pb

from tests.harness import eventually, free_port
from tests.integration.scaled_out import (
    Customer,
    ScaledOut,
    chat_request,
    cost,
    scaled_out,
    wait_until_listening,
)

pytestmark = pytest.mark.integration

CREDITS = 100_000_000


class OwnRedis:
    """A redis-server process on a port of its own, stopped and started at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._workdir = workdir
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._workdir),
            stdout=asyncio.subprocess.DEVNULL,
        )
        await wait_until_listening(self.port, self._process)

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            await self._process.wait()


@pytest.fixture(scope="module")
async def own_redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(Path(tmp_path_factory.mktemp("redis")))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def platform(
    tmp_path_factory: pytest.TempPathFactory, integration_database: str, own_redis: OwnRedis
) -> AsyncIterator[ScaledOut]:
    logs = Path(tmp_path_factory.mktemp("outage"))
    async with scaled_out(logs, integration_database, own_redis.url) as running:
        await running.agent("node")
        async with httpx.AsyncClient(timeout=30) as http:
            await running.wait_until_serving(http)
        yield running


@dataclass
class Load:
    """Requests sent one after another through each gateway until stopped."""

    customer: Customer
    responses: list[httpx.Response] = field(default_factory=list)

    async def run(self, http: httpx.AsyncClient, gateway: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.responses.append(await _chat(http, gateway, self.customer))

    def more_than(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.responses) > count


async def test_requests_are_served_through_a_redis_outage_and_charged_once(
    platform: ScaledOut, own_redis: OwnRedis
) -> None:
    # Limits high enough never to refuse: every request goes through the counters.
    limits = rate_limits_pb.RateLimits(requests_per_minute=100_000, concurrent_requests=100)
    load = Load(await platform.customer(credits=CREDITS, limits=limits))
    key_counters = platform.redis_names.rate_bucket(f"key:{load.customer.api_key_id}")
    # Trusted by both replicas for an hour, revoked while Redis is down.
    revoked_unheard = await platform.customer(credits=1_000_000)
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=30) as http:
        for gateway in platform.gateways:
            assert (await _chat(http, gateway, revoked_unheard)).status_code == 200
        senders = [asyncio.create_task(load.run(http, g, stop)) for g in platform.gateways]
        try:
            await eventually(load.more_than(10), timeout_s=60)
            assert await _holds(own_redis, key_counters)

            await own_redis.stop()
            await platform.revoke(revoked_unheard)  # its announcement is lost
            served = len(load.responses)
            await eventually(load.more_than(served + 20), timeout_s=60)

            await own_redis.start()
            # Redis came back empty: the key's counters reappear once the replicas
            # use it again, and both replicas subscribe again.
            async with asyncio.timeout(60):
                while not await _holds(own_redis, key_counters):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                while await _subscribers(own_redis, platform) < len(platform.clouds):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            served = len(load.responses)
            await eventually(load.more_than(served + 10), timeout_s=60)
        finally:
            stop.set()
            await asyncio.gather(*senders)

        codes = [response.status_code for response in load.responses]
        assert set(codes) == {200}, codes
        balance = await platform.balance(load.customer.account_id)
        assert balance.held_micro_credits == 0
        charged = sum(cost(response.json()["usage"]) for response in load.responses)
        assert balance.available_micro_credits == CREDITS - charged

        # Having re-subscribed, each replica dropped the entries it trusted, so the
        # key revoked during the outage is refused; and the bus works again: a
        # revocation now reaches both replicas.
        await _refused_everywhere(http, platform, revoked_unheard)
        await platform.revoke(load.customer)
        await _refused_everywhere(http, platform, load.customer)


async def _chat(http: httpx.AsyncClient, gateway: str, customer: Customer) -> httpx.Response:
    return await http.post(
        f"{gateway}/v1/chat/completions", json=chat_request(), headers=customer.headers
    )


async def _refused_everywhere(
    http: httpx.AsyncClient, platform: ScaledOut, customer: Customer
) -> None:
    async with asyncio.timeout(30):  # bounds a broken test; caches trust keys for an hour
        for gateway in platform.gateways:
            while (await _chat(http, gateway, customer)).status_code != 401:  # noqa: ASYNC110
                await asyncio.sleep(0.01)


async def _holds(server: OwnRedis, key: str) -> bool:
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


async def _subscribers(server: OwnRedis, platform: ScaledOut) -> int:
    """How many replicas listen for invalidations."""
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        [(_, count)] = await client.pubsub_numsub(platform.redis_names.invalidations)
        return int(count)
    finally:
        await client.aclose()
