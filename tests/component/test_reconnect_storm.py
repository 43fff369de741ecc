"""500 agents lose their network server at once and come back spread out, not in a spike."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from datetime import UTC, datetime

from agent.backoff import Backoff
from agent.session import AgentSession, SessionSettings
from server.network.service import LivenessSettings
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import eventually, start_network

AGENTS = 500
# Generous liveness: 500 sessions share this process's event loop.
LIVENESS = LivenessSettings(heartbeat_interval_s=2.0, heartbeat_timeout_s=30.0)
BACKOFF_BASE_S = 1.0


async def test_agents_reconnect_after_a_restart_spread_by_jitter(postgres_dsn: str) -> None:
    network = await start_network(postgres_dsn, liveness=LIVENESS)
    port, network_id = network.port, network.component.service.admission.settings.network_id
    sessions = [
        AgentSession(
            SessionSettings(network.target, f"n{i}"),
            ScriptedRuntime(),
            backoff=Backoff(base_s=BACKOFF_BASE_S, cap_s=4.0, rng=random.Random(i)),
        )
        for i in range(AGENTS)
    ]
    tasks = [asyncio.create_task(session.run_forever()) for session in sessions]
    try:
        await eventually(lambda: len(network.component.service.nodes()) == AGENTS, timeout_s=60)
        # A session learns its id from the welcome, which may trail registration.
        await eventually(lambda: all(s.connected.is_set() for s in sessions), timeout_s=60)
        first_ids = {session.node_id for session in sessions}

        # The server goes away telling everyone to reconnect, and comes straight back.
        restarted_at = datetime.now(UTC)
        await network.stop(grace_s=2.0)
        network = await start_network(
            postgres_dsn, liveness=LIVENESS, port=port, network_id=network_id
        )
        service = network.component.service
        await eventually(lambda: len(service.nodes()) == AGENTS, timeout_s=60)

        # Every node came back to the fresh server, under its key's stable id.
        assert {node.node_id for node in service.nodes()} == first_ids
        offsets = sorted(
            (node.connected_at - restarted_at).total_seconds() for node in service.nodes()
        )
        # Full jitter spreads the first attempts over the backoff window: no
        # slice of a tenth of the window holds more than a quarter of the fleet...
        buckets = Counter(int(offset / BACKOFF_BASE_S * 10) for offset in offsets)
        assert max(buckets.values()) <= AGENTS // 4
        # ...and the middle 80% of the fleet is spread over a good part of it.
        spread = offsets[AGENTS * 9 // 10] - offsets[AGENTS // 10]
        assert spread >= BACKOFF_BASE_S / 2
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await network.stop()
