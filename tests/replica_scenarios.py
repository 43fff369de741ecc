"""Scenarios of two network replicas in one process sharing node presence: each
routes over both replicas' nodes, a job for the other's node runs through it, and
jobs and agents survive the loss of a node or of a replica. A test module
subclasses ``ReplicaScenarios`` and provides the ``pair`` fixture."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from agent.backoff import Backoff
from agent.session import AgentSession, SessionSettings
from server.common.bus_memory import MemoryBus
from server.common.credentials import generate_service_token
from server.network.presence import Presence
from server.network.service import LivenessSettings
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import JobStream, NetworkServer, eventually, start_network

SCRIPT = " ".join(f"w{i}" for i in range(60))
LIVENESS = LivenessSettings(heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, suspect_after_s=0.5)


@dataclass
class ReplicaPair:
    a: NetworkServer
    b: NetworkServer
    agents: list[tuple[AgentSession, ScriptedRuntime, asyncio.Task[None]]] = field(
        default_factory=list
    )

    async def agent(self, network: str, name: str) -> tuple[AgentSession, ScriptedRuntime]:
        runtime = ScriptedRuntime(script=SCRIPT, token_delay_s=0.02)
        session = AgentSession(
            SessionSettings(network=network, node_name=name, batch_tokens=1),
            runtime,
            backoff=Backoff(base_s=0.05, cap_s=0.2),
        )
        task = asyncio.create_task(session.run_forever())
        self.agents.append((session, runtime, task))
        await eventually(lambda: session.connected.is_set())
        return session, runtime

    async def stop_agent(self, session: AgentSession) -> None:
        for running, _, task in self.agents:
            if running is session:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def ready_nodes(network: NetworkServer) -> int:
    [model] = [m for m in network.component.service.models() if m.id == MODEL_ID]
    return model.ready_nodes


@contextlib.asynccontextmanager
async def replica_pair(
    dsn: str, network_id: str, presences: Sequence[Presence]
) -> AsyncIterator[ReplicaPair]:
    """Replicas "replica-a" and "replica-b" of one network, on ``presences`` (one
    each; the same store for in-process presence)."""
    token, bus = generate_service_token(), MemoryBus()
    replicas = [
        await start_network(
            dsn,
            liveness=LIVENESS,
            network_id=network_id,
            service_token=token,
            bus=bus,
            replica_id=name,
            presence=presence,
        )
        for name, presence in zip(("replica-a", "replica-b"), presences, strict=True)
    ]
    pair = ReplicaPair(*replicas)
    try:
        yield pair
    finally:
        for _, _, task in pair.agents:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for replica in replicas:
            await replica.stop()
        await bus.close()


class ReplicaScenarios:
    async def test_a_job_through_one_replica_runs_on_a_node_of_the_other(
        self, pair: ReplicaPair
    ) -> None:
        session, runtime = await pair.agent(pair.b.target, "on-b")
        await eventually(lambda: ready_nodes(pair.a) == 1)
        assert pair.a.component.service.nodes() == []

        job = JobStream(pair.a, "job-forwarded")
        await asyncio.wait_for(job.task, timeout=30)

        assert job.text == SCRIPT
        assert [e.assigned.node_id for e in job.of("assigned")] == [session.node_id]
        assert not job.of("migrated")
        [finished] = job.of("finished")
        assert [(u.node_id, u.usage.completion_tokens) for u in finished.finished.node_usage] == [
            (session.node_id, 60)
        ]
        assert len(runtime.started_jobs) == 1
        assert pair.b.component.service.node(str(session.node_id)).active_jobs == set()

    async def test_a_forwarded_job_whose_node_is_lost_moves_on_with_its_text_intact(
        self, pair: ReplicaPair
    ) -> None:
        lost, _ = await pair.agent(pair.b.target, "on-b")
        await eventually(lambda: ready_nodes(pair.a) == 1)
        job = JobStream(pair.a, "job-moves")
        await eventually(lambda: len(job.of("delta")) >= 10)
        survivor, _ = await pair.agent(pair.a.target, "on-a")
        await pair.stop_agent(lost)

        await asyncio.wait_for(job.task, timeout=30)
        assert job.text == SCRIPT
        [migrated] = job.of("migrated")
        assert migrated.migrated.node_id == survivor.node_id
        [finished] = job.of("finished")
        shares = finished.finished.node_usage
        assert [share.node_id for share in shares] == [lost.node_id, survivor.node_id]
        assert sum(share.usage.completion_tokens for share in shares) == 60

    async def test_cancelling_a_forwarded_job_cancels_it_on_the_node(
        self, pair: ReplicaPair
    ) -> None:
        session, runtime = await pair.agent(pair.b.target, "on-b")
        await eventually(lambda: ready_nodes(pair.a) == 1)
        job = JobStream(pair.a, "job-cancelled")
        await eventually(lambda: len(job.of("delta")) >= 3)
        job.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job.task

        await eventually(lambda: runtime.cancelled_jobs == 1)
        node = pair.b.component.service.node(str(session.node_id))
        await eventually(lambda: node.active_jobs == set())

    async def test_when_a_replica_dies_its_agents_rehome_and_forwarded_jobs_continue(
        self, pair: ReplicaPair
    ) -> None:
        homeless, _ = await pair.agent(f"{pair.b.target},{pair.a.target}", "on-b")
        await eventually(lambda: ready_nodes(pair.a) == 1)
        job = JobStream(pair.a, "job-replica-lost")
        await eventually(lambda: len(job.of("delta")) >= 10)
        survivor, _ = await pair.agent(pair.a.target, "on-a")

        # Replica B goes away without a word to anyone (no Reconnect, no withdrawal).
        await pair.b.server.stop(None)

        await asyncio.wait_for(job.task, timeout=30)
        assert job.text == SCRIPT
        [migrated] = job.of("migrated")
        assert migrated.migrated.node_id == survivor.node_id
        shares = job.of("finished")[0].finished.node_usage
        assert sum(share.usage.completion_tokens for share in shares) == 60
        # The agent found replica A on its own.
        service = pair.a.component.service
        await eventually(lambda: homeless.node_id in {n.node_id for n in service.nodes()})
        assert homeless.target == pair.a.target
        await eventually(lambda: ready_nodes(pair.a) == 2)

    async def test_when_a_replica_drains_its_agents_rehome_and_forwarded_jobs_continue(
        self, pair: ReplicaPair
    ) -> None:
        homeless, _ = await pair.agent(f"{pair.b.target},{pair.a.target}", "on-b")
        await eventually(lambda: ready_nodes(pair.a) == 1)
        job = JobStream(pair.a, "job-replica-drained")
        await eventually(lambda: len(job.of("delta")) >= 10)
        survivor, _ = await pair.agent(pair.a.target, "on-a")

        # Replica B shuts down cleanly: its agents are told to reconnect elsewhere.
        await pair.b.stop()

        await asyncio.wait_for(job.task, timeout=30)
        assert job.text == SCRIPT
        assert [m.migrated.node_id for m in job.of("migrated")] == [survivor.node_id]
        service = pair.a.component.service
        await eventually(lambda: homeless.node_id in {n.node_id for n in service.nodes()})
        assert homeless.target == pair.a.target
