"""A cloud replica that dies mid-request leaves its hold to the others: once its lease
lapses, another replica settles the hold from the network's job record (charging the
relayed tokens, paying the operator), once; a live request's lease is kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from core.inference import ChatMessage, ChatRole, Usage
from core.replica_channels import ReplicaChannels
from server.cloud.clients import GrpcAccountClient, GrpcNetworkClient
from server.cloud.component import CloudComponent
from server.cloud.inference import InferenceService
from server.cloud.inflight import InFlightLeases
from server.cloud.inflight_store import PostgresInFlightStore
from server.cloud.pricing import cost
from server.cloud.requests import ChatRequest, CompletionFinished, ContentDelta
from server.cloud.settings import InFlightSettings
from server.common.database import create_pool
from server.common.settlements import Settlement
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import Customer, Platform, running_platform

LONG_SCRIPT = " ".join(f"w{i}" for i in range(200))
# Short, so that a dead replica's requests are settled quickly here.
FAST = InFlightSettings(lease_s=0.3, sweep_interval_s=0.05, running_grace_s=10)
# A live replica renews every third of its lease; on a loaded machine a renewal
# can come 0.2 s late, so the test that a live request keeps its lease gives it room.
ROOMY = InFlightSettings(lease_s=1.5, sweep_interval_s=0.05, running_grace_s=10)
REQUEST = ChatRequest(
    model=MODEL_ID, messages=(ChatMessage(ChatRole.USER, "hello there"),), max_tokens=500
)


class ReplicaDied(Exception):
    pass


class DiesBeforeSettling:
    """A replica killed between its last token and its settlement."""

    async def settle(self, settlement: Settlement) -> int:
        raise ReplicaDied(settlement.hold_id)


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as platform:
        yield platform


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


def _token(platform: Platform) -> str:
    [(_, bearer)] = platform.service
    return bearer.removeprefix("Bearer ")


@contextlib.asynccontextmanager
async def _replica(
    platform: Platform, dsn: str, inflight: InFlightSettings = FAST
) -> AsyncIterator[CloudComponent]:
    cloud = await CloudComponent.start(
        dsn,
        account_target=platform.target,
        network_target=platform.target,
        service_token=_token(platform),
        inflight=inflight,
    )
    try:
        yield cloud
    finally:
        await cloud.stop()


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    """Waits until the awaitable ``condition()`` holds; the timeout bounds a broken test."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.02)


async def test_a_dead_replicas_hold_is_settled_from_the_job_record(
    platform: Platform, postgres_dsn: str, db: asyncpg.Connection[Any]
) -> None:
    operator, node_token = await platform.operator()
    await platform.start_agent(
        ScriptedRuntime(script=LONG_SCRIPT, token_delay_s=0.005), "n", node_token
    )
    customer = await platform.customer(credits=1_000_000)
    token = _token(platform)
    pool = await create_pool(postgres_dsn)
    replicas = ReplicaChannels(platform.target)
    try:
        dying = InferenceService(
            GrpcAccountClient(replicas, token),
            GrpcNetworkClient(replicas, token),
            settlements=DiesBeforeSettling(),
            # It never renews: dead right after admission, as far as the others can tell.
            inflight=InFlightLeases(PostgresInFlightStore(pool), lease_s=FAST.lease_s),
        )
        events = dying.stream(f"Bearer {customer.api_key}", REQUEST, "req-orphan")
        deltas = 0
        async for event in events:
            deltas += isinstance(event, ContentDelta)
            if deltas == 5:
                break
        with pytest.raises(ReplicaDied):
            await events.aclose()

        async def recorded() -> bool:
            # The record is written beside the first job, not before it: wait for it.
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM cloud_inflight_requests WHERE request_id = 'req-orphan'"
                )
            )

        await _until(recorded)
        [row] = await db.fetch(
            "SELECT * FROM cloud_inflight_requests WHERE request_id = 'req-orphan'"
        )
        held = (await platform.balance(customer)).held_micro_credits
        assert held == row["hold_amount"] > 0
    finally:
        await replicas.close()
        await pool.close()

    async with _replica(platform, postgres_dsn) as replica:

        async def settled() -> bool:
            return not await db.fetchval(
                "SELECT count(*) FROM cloud_inflight_requests WHERE request_id = 'req-orphan'"
            )

        await _until(settled)
        # Nothing left to settle: a second sweep settles nothing.
        assert await replica.orphans.sweep() == 0
        price = (await replica.inference.models.get(MODEL_ID)).price

    job = await db.fetchrow(
        """SELECT prompt_tokens, completion_tokens, outcome FROM network_jobs
           WHERE request_id = 'req-orphan'"""
    )
    assert job["outcome"] == "cancelled"
    assert job["completion_tokens"] >= 5
    charged = cost(price, Usage(job["prompt_tokens"], job["completion_tokens"]))
    balance = await platform.balance(customer)
    assert (balance.available_micro_credits, balance.held_micro_credits) == (
        1_000_000 - charged,
        0,
    )
    earned = (await platform.balance(Customer(operator, ""))).earned_micro_credits
    assert 0 < earned < charged
    totals = await db.fetchrow(
        """SELECT sum(credits_posted - debits_posted) AS posted,
                  sum(credits_pending - debits_pending) AS pending
           FROM ledger_accounts"""
    )
    assert (totals["posted"], totals["pending"]) == (0, 0)


async def test_a_live_request_keeps_its_lease_and_settles_itself(
    platform: Platform, postgres_dsn: str, db: asyncpg.Connection[Any]
) -> None:
    await platform.start_agent(ScriptedRuntime(script=LONG_SCRIPT[:200]), "n")
    customer = await platform.customer(credits=1_000_000)
    async with _replica(platform, postgres_dsn, ROOMY) as replica:
        events = replica.inference.stream(f"Bearer {customer.api_key}", REQUEST, "req-live")
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, ContentDelta):
                    break
            # Several leases and many sweeps pass while the request waits on its caller.
            await asyncio.sleep(3 * ROOMY.lease_s)
            row = await db.fetchrow(
                "SELECT * FROM cloud_inflight_requests WHERE request_id = 'req-live'"
            )
            assert row is not None
            assert row["orphaned_at"] is None
            finished = [event async for event in events][-1]
        assert isinstance(finished, CompletionFinished)
        price = (await replica.inference.models.get(MODEL_ID)).price
        assert finished.charged == cost(price, finished.usage) > 0
        await replica.inference.drain()  # the record is forgotten beside the answer
        assert not await db.fetchval(
            "SELECT count(*) FROM cloud_inflight_requests WHERE request_id = 'req-live'"
        )
    balance = await platform.balance(customer)
    assert balance.available_micro_credits == 1_000_000 - finished.charged
