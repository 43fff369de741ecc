"""The whole platform scaled out, every service its own OS process on the real
PostgreSQL, Redis and RabbitMQ: 2 account, 2 network, 2 cloud and 2 gateway
replicas (the first gateway calling the first cloud replica, the second both),
and three agents spread over both network replicas, one of them `resultity agent`
running SmolLM2 through llama.cpp.

Requests through either gateway reach the nodes of either network replica (each
request pinned to one node by its region, and the job record naming that node),
and each is billed for its usage, the operators paid and the ledger conserved.
An account replica killed costs no request; a cloud replica killed mid-stream
fails that stream, another cloud replica settles its hold from the network's
job record within the in-flight lease, not an hour later, and the gateway given
both cloud replicas stays ready and serves on through the other.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from resultity.account.v1 import ledger_service_pb2 as ledger_pb

from gateway.openapi import REGION_HEADER
from tests.integration.scaled_out import Agent, Customer, ScaledOut, cost, scaled_out

pytestmark = pytest.mark.integration

CREDITS = 100_000_000
# Each scripted node's text is its own: a reply shows which node wrote it.
SCRIPTS = {
    "alpha": " ".join(f"alpha{i}" for i in range(200)),
    "beta": " ".join(f"beta{i}" for i in range(200)),
}
# A dead cloud replica's requests are settled by the others once their lease lapses.
INFLIGHT = {
    "RESULTITY_CLOUD_INFLIGHT_LEASE_S": "2",
    "RESULTITY_CLOUD_INFLIGHT_SWEEP_INTERVAL_S": "0.5",
    "RESULTITY_CLOUD_INFLIGHT_RUNNING_GRACE_S": "10",
}
# Bounds a broken test (waits poll), not the platform's latency.
SETTLED_TIMEOUT_S = 60.0


@dataclass
class Topology:
    platform: ScaledOut
    # By region: the agent pinned there and the network replica that owns its node.
    agents: dict[str, tuple[Agent, int]]
    db: asyncpg.Connection[Any]

    @property
    def operators(self) -> list[str]:
        return [agent.operator_id for agent, _ in self.agents.values()]


@pytest.fixture(scope="module")
async def topology(
    tmp_path_factory: pytest.TempPathFactory,
    integration_database: str,
    redis_url: str,
    amqp_url: str,
) -> AsyncIterator[Topology]:
    logs = Path(tmp_path_factory.mktemp("topology"))
    async with scaled_out(
        logs,
        integration_database,
        redis_url,
        accounts=2,
        networks=2,
        replicas=2,
        amqp_url=amqp_url,
        env=INFLIGHT,
        gateway_clouds=((0,), (1, 0)),
    ) as platform:
        # The agents' first addresses: alpha on replica 0, beta and the real model on 1.
        agents = {
            "r-llama": (
                await platform.agent("llama", homes=(1, 0), region="r-llama", llama=True),
                1,
            ),
            "r-alpha": (
                await platform.agent(
                    "alpha", homes=(0, 1), region="r-alpha", script=SCRIPTS["alpha"],
                    token_delay_s=0.05,
                ),
                0,
            ),
            "r-beta": (
                await platform.agent(
                    "beta", homes=(1, 0), region="r-beta", script=SCRIPTS["beta"],
                    token_delay_s=0.05,
                ),
                1,
            ),
        }  # fmt: skip
        await platform.wait_for_nodes(len(agents))
        async with httpx.AsyncClient(timeout=120) as http:
            await platform.wait_until_serving(http)
        db = await asyncpg.connect(integration_database)
        try:
            yield Topology(platform, agents, db)
        finally:
            await db.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=120) as client:
        yield client


def _chat(max_tokens: int, *, stream: bool = False) -> dict[str, object]:
    return {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _headers(customer: Customer, region: str) -> dict[str, str]:
    return {**customer.headers, REGION_HEADER: region}


async def _job_nodes(db: asyncpg.Connection[Any], request_id: str) -> list[str]:
    """The nodes the network's job record of the request names (written behind)."""
    async with asyncio.timeout(SETTLED_TIMEOUT_S):
        while True:
            rows = await db.fetch(
                "SELECT assignments FROM network_jobs WHERE request_id = $1", request_id
            )
            if rows:
                return [a["node_id"] for row in rows for a in json.loads(row["assignments"])]
            await asyncio.sleep(0.1)


@dataclass
class Books:
    """The ledger's system accounts and what the agents' operators have earned."""

    summary: ledger_pb.GetLedgerSummaryResponse
    earned: int

    @classmethod
    async def read(cls, platform: ScaledOut, operators: Sequence[str]) -> Books:
        earned = [(await platform.balance(o)).earned_micro_credits for o in operators]
        return cls(await platform.ledger_summary(), sum(earned))


async def _settled(platform: ScaledOut, customer: Customer) -> ledger_pb.Balance:
    """The customer's balance once no hold of theirs is open."""
    async with asyncio.timeout(SETTLED_TIMEOUT_S):
        while (balance := await platform.balance(customer.account_id)).held_micro_credits:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return balance


def _assert_conserved(before: Books, after: Books, charged: int) -> None:
    """What consumers were charged went to the operators and the platform, exactly;
    no credit entered or left (no top-up meanwhile)."""
    summary = after.summary
    assert summary.total_debits_micro_credits == summary.total_credits_micro_credits
    assert summary.cash_in_micro_credits == before.summary.cash_in_micro_credits
    revenue = summary.platform_revenue_micro_credits - before.summary.platform_revenue_micro_credits
    assert revenue + after.earned - before.earned == charged


async def test_either_gateway_reaches_nodes_on_either_network_replica(
    topology: Topology, http: httpx.AsyncClient
) -> None:
    platform = topology.platform
    owned = {
        node.region: (network, node.node_id)
        for network in range(len(platform.networks))
        for node in await platform.nodes_of(network)
    }
    assert {region: network for region, (network, _) in owned.items()} == {
        region: network for region, (_, network) in topology.agents.items()
    }
    customer = await platform.customer(credits=CREDITS)
    before = await Books.read(platform, topology.operators)

    charged = 0
    texts: dict[tuple[str, str], str] = {}
    for gateway in platform.gateways:
        for region in topology.agents:
            response = await http.post(
                f"{gateway}/v1/chat/completions",
                json=_chat(max_tokens=4),
                headers=_headers(customer, region),
            )
            assert response.status_code == 200, response.text
            body = response.json()
            texts[gateway, region] = body["choices"][0]["message"]["content"]
            charged += cost(body["usage"])
            # The network's record names the node of the region, whichever replica
            # the cloud replica asked and whichever owns the node.
            nodes = await _job_nodes(topology.db, response.headers["x-request-id"])
            assert nodes == [owned[region][1]]

    for (_, region), text in texts.items():
        script = SCRIPTS.get(region.removeprefix("r-"))
        assert text, region
        assert script is None or script.startswith(text), (region, text)
    # Greedy SmolLM2 answers alike through both gateways.
    first, second = platform.gateways
    assert texts[first, "r-llama"] == texts[second, "r-llama"]

    balance = await _settled(platform, customer)
    assert balance.available_micro_credits == CREDITS - charged
    _assert_conserved(before, await Books.read(platform, topology.operators), charged)


async def test_an_account_replica_killed_costs_no_request(
    topology: Topology, http: httpx.AsyncClient
) -> None:
    platform = topology.platform
    await platform.processes.kill("account-0")
    # Created through the survivor: cloud replicas meet the dead one when they
    # authenticate the new key, and go on.
    customer = await platform.customer(credits=CREDITS)
    before = await Books.read(platform, topology.operators)
    charged = 0
    for gateway in platform.gateways:
        for region in ("r-alpha", "r-beta"):
            response = await http.post(
                f"{gateway}/v1/chat/completions",
                json=_chat(max_tokens=4),
                headers=_headers(customer, region),
            )
            assert response.status_code == 200, response.text
            charged += cost(response.json()["usage"])
    balance = await _settled(platform, customer)
    assert balance.available_micro_credits == CREDITS - charged
    _assert_conserved(before, await Books.read(platform, topology.operators), charged)


async def test_a_cloud_replica_killed_mid_stream_has_its_hold_settled_by_another(
    topology: Topology, http: httpx.AsyncClient
) -> None:
    platform = topology.platform
    customer = await platform.customer(credits=CREDITS)
    before = await Books.read(platform, topology.operators)
    received: list[str] = []
    errors: list[dict[str, Any]] = []
    killed = False
    async with http.stream(
        "POST",
        f"{platform.gateways[0]}/v1/chat/completions",
        json=_chat(max_tokens=200, stream=True),
        headers=_headers(customer, "r-alpha"),
    ) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            received.append(content or "")
            if not killed and len("".join(received).split()) >= 5:
                await platform.processes.kill("cloud-0")
                killed = True
    text = "".join(received)
    # The client was told: its stream ended with an error, not a truncated success.
    assert errors, text
    assert len(text.split()) < 200
    assert SCRIPTS["alpha"].startswith(text)

    # The surviving replica settles the hold from the job record: the tokens the
    # network relayed (at least what the client got), the operator paid.
    balance = await _settled(platform, customer)
    job = await topology.db.fetchrow(
        "SELECT prompt_tokens, completion_tokens FROM network_jobs WHERE request_id = $1",
        request_id,
    )
    assert job is not None
    assert job["completion_tokens"] >= len(text.split())
    charged = cost(
        {"prompt_tokens": job["prompt_tokens"], "completion_tokens": job["completion_tokens"]}
    )
    assert balance.available_micro_credits == CREDITS - charged
    assert not await topology.db.fetchval(
        "SELECT count(*) FROM cloud_inflight_requests WHERE request_id = $1", request_id
    )
    _assert_conserved(before, await Books.read(platform, topology.operators), charged)

    # The other gateway, given both cloud replicas, serves on through the live one:
    # reads and streams that meet the dead replica go on to the other (a unary
    # completion is sent once: one meeting the dead replica would fail, by design).
    gateway = platform.gateways[1]
    assert (await http.get(f"{gateway}/ready")).status_code == 200
    for _ in range(4):
        models = await http.get(f"{gateway}/v1/models", headers=customer.headers)
        assert models.status_code == 200, models.text
        streamed = await http.post(
            f"{gateway}/v1/chat/completions",
            json=_chat(max_tokens=4, stream=True),
            headers=_headers(customer, "r-beta"),
        )
        assert streamed.status_code == 200, streamed.text
        assert '"error"' not in streamed.text
        assert SCRIPTS["beta"].split()[0] in streamed.text
