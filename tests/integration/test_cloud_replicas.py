"""Two cloud and two gateway replicas, each its own process, agree through Redis:
a per-key limit holds across both, and a revoked key or archived subcloud stops
working on both at once (their key caches would trust it for an hour)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from resultity.account.v1 import rate_limits_pb2 as rate_limits_pb
from resultity.cloud.v1 import subcloud_service_pb2 as subcloud_pb
from resultity.cloud.v1 import subcloud_service_pb2_grpc as subcloud_grpc

from core import channels
from server.network.catalog import SMOLLM2_135M
from tests.integration.scaled_out import (
    Customer,
    ScaledOut,
    chat_request,
    cost,
    scaled_out,
)

pytestmark = pytest.mark.integration

LIMIT = 5


@pytest.fixture(scope="module")
async def platform(
    tmp_path_factory: pytest.TempPathFactory, integration_database: str, redis_url: str
) -> AsyncIterator[ScaledOut]:
    logs = Path(tmp_path_factory.mktemp("replicas"))
    async with scaled_out(logs, integration_database, redis_url) as running:
        await running.agent("node")
        async with httpx.AsyncClient(timeout=30) as http:
            await running.wait_until_serving(http)
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def _chat(http: httpx.AsyncClient, gateway: str, customer: Customer) -> httpx.Response:
    return await http.post(
        f"{gateway}/v1/chat/completions", json=chat_request(), headers=customer.headers
    )


async def test_a_per_key_limit_admits_exactly_the_limit_across_replicas(
    platform: ScaledOut, http: httpx.AsyncClient
) -> None:
    limits = rate_limits_pb.RateLimits(requests_per_minute=LIMIT)
    one_by_one = await platform.customer(credits=10_000_000, limits=limits)
    alternating = [
        await _chat(http, platform.gateways[turn % 2], one_by_one) for turn in range(3 * LIMIT)
    ]
    burst = await platform.customer(credits=10_000_000, limits=limits)
    together = await asyncio.gather(
        *(_chat(http, platform.gateways[turn % 2], burst) for turn in range(3 * LIMIT))
    )

    for customer, responses in ((one_by_one, alternating), (burst, together)):
        codes = [response.status_code for response in responses]
        assert codes.count(200) == LIMIT, codes
        assert codes.count(429) == 2 * LIMIT, codes
        refused = next(response for response in responses if response.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        # Refused requests cost nothing; served ones exactly their usage.
        served = [response.json()["usage"] for response in responses if response.status_code == 200]
        balance = await platform.balance(customer.account_id)
        assert balance.held_micro_credits == 0
        assert balance.available_micro_credits == 10_000_000 - sum(map(cost, served))


async def _refused_everywhere(
    http: httpx.AsyncClient, platform: ScaledOut, customer: Customer
) -> list[float]:
    """Seconds until each gateway answered 401 for the customer's key."""
    started = time.monotonic()

    async def refused(gateway: str) -> float:
        while (await _chat(http, gateway, customer)).status_code != 401:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    async with asyncio.timeout(30):  # bounds a broken test, not the latency
        return await asyncio.gather(*(refused(gateway) for gateway in platform.gateways))


async def test_a_revoked_key_is_refused_by_every_replica(
    platform: ScaledOut, http: httpx.AsyncClient, record_property: pytest.RecordProperty
) -> None:
    customer = await platform.customer(credits=1_000_000)
    for gateway in platform.gateways:  # both replicas now trust the key for an hour
        assert (await _chat(http, gateway, customer)).status_code == 200

    await platform.revoke(customer)
    delays = await _refused_everywhere(http, platform, customer)
    record_property("revocation_seconds", delays)


async def test_an_archived_subcloud_stops_its_keys_on_every_replica(
    platform: ScaledOut, http: httpx.AsyncClient, record_property: pytest.RecordProperty
) -> None:
    owner = await platform.customer(credits=1_000_000)
    async with (
        channels.insecure_channel(platform.clouds[0]) as first_channel,
        channels.insecure_channel(platform.clouds[1]) as second_channel,
    ):
        first = subcloud_grpc.SubcloudServiceStub(first_channel)
        second = subcloud_grpc.SubcloudServiceStub(second_channel)
        subcloud = (
            await first.CreateSubcloud(
                subcloud_pb.CreateSubcloudRequest(
                    name="team",
                    owner_account_id=owner.account_id,
                    models=[subcloud_pb.SubcloudModel(model=SMOLLM2_135M.id)],
                ),
                metadata=platform.service,
            )
        ).subcloud
        issued = await second.CreateSubcloudApiKey(
            subcloud_pb.CreateSubcloudApiKeyRequest(
                subcloud_id=subcloud.subcloud_id, account_id=owner.account_id
            ),
            metadata=platform.service,
        )
        member = Customer(owner.account_id, issued.secret, issued.api_key_id)
        for gateway in platform.gateways:
            assert (await _chat(http, gateway, member)).status_code == 200

        # Archived through the first replica; the second learns it from the bus.
        await first.ArchiveSubcloud(
            subcloud_pb.ArchiveSubcloudRequest(subcloud_id=subcloud.subcloud_id),
            metadata=platform.service,
        )
    delays = await _refused_everywhere(http, platform, member)
    record_property("archive_seconds", delays)
