"""Schemathesis against the gateway's own OpenAPI document, on a real platform.

Every case carries a real key with credits and targets served models often
enough to get past authentication and model lookup, so the generated bodies
reach cloud's validation, the network and a node. The property: no answer is a
server error, every refusal is the OpenAI error envelope, and the node still
serves afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.openapi import REGION_HEADER
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Platform, running_platform, serving_gateway

pytestmark = pytest.mark.fuzz

# Cases per operation; the whole module stays within a few minutes on two cores.
EXAMPLES = 150


@dataclass
class Gateway:
    platform: Platform
    base_url: str
    api_key: str


@pytest.fixture(scope="module")
async def gateway(postgres_dsn: str) -> AsyncIterator[Gateway]:
    async with running_platform(postgres_dsn) as platform:
        await platform.start_agent(ScriptedRuntime(), batch_tokens=8)
        customer = await platform.customer(10**12)
        async with serving_gateway(platform.target) as base_url:
            yield Gateway(platform, base_url, customer.api_key)


def _fuzz(base_url: str, api_key: str) -> list[str]:
    """Runs in a worker thread (schemathesis calls are blocking) while the platform
    serves on the event loop; returns the failures found."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    headers = {"authorization": f"Bearer {api_key}"}
    failures: list[str] = []
    served = st.sampled_from([SMOLLM2_135M.id, "no-such-model"])
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(), model=served, use_served=st.booleans())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case, model: str, use_served: bool) -> None:
            # Steer most bodies to a model that exists, on any node, so they get past
            # its lookup (a region no node is in is a 503, no_capacity).
            if use_served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
                if case.headers:
                    case.headers.pop(REGION_HEADER, None)
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            if response.status_code == 503 and response.json()["error"]["code"] == "no_capacity":
                return  # no node in the generated region
            if response.status_code >= 500 or (
                response.status_code >= 400 and "error" not in response.json()
            ):
                failures.append(
                    f"{case.method} {case.path} {case.body!r:.300} -> "
                    f"{response.status_code} {response.text:.300}"
                )

        check()
    return failures


async def test_no_server_errors_and_the_node_still_serves(gateway: Gateway) -> None:
    failures = await asyncio.to_thread(_fuzz, gateway.base_url, gateway.api_key)

    assert failures == []
    async with httpx.AsyncClient(
        base_url=gateway.base_url, headers={"authorization": f"Bearer {gateway.api_key}"}
    ) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": SMOLLM2_135M.id, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 200
    assert [agent.session.node_id for agent in gateway.platform.agents] == [
        node.node_id for node in gateway.platform.network.service.nodes()
    ]
