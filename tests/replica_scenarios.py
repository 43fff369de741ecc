"""Scenarios of two network replicas in one process sharing node presence: each
routes over both replicas' nodes, a job for the other's node runs through it,
jobs and agents survive the loss of a node or of a replica, and an operator
lists and acts on the other replica's nodes through either. A test module
subclasses ``ReplicaScenarios`` and provides the ``pair`` fixture."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.backoff import Backoff
from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION, AgentSession, SessionSettings
from core import channels
from core.grpc_errors import error_info
from server.common.bus_memory import MemoryBus
from server.common.credentials import generate_service_token
from server.network.nodes import NodeState
from server.network.presence import NodePresence, Presence
from server.network.service import LivenessSettings
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import (
    JobStream,
    NetworkServer,
    eventually,
    free_port,
    open_raw_session,
    start_network,
    until,
)

SCRIPT = " ".join(f"w{i}" for i in range(60))
LIVENESS = LivenessSettings(heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, suspect_after_s=0.5)


@dataclass
class ReplicaPair:
    a: NetworkServer
    b: NetworkServer
    # Each replica's presence adapter (the same one for in-process presence).
    presences: Sequence[Presence] = ()
    agents: list[tuple[AgentSession, ScriptedRuntime, asyncio.Task[None]]] = field(
        default_factory=list
    )

    async def agent(
        self, network: str, name: str, identity: NodeIdentity | None = None
    ) -> tuple[AgentSession, ScriptedRuntime]:
        runtime = ScriptedRuntime(script=SCRIPT, token_delay_s=0.02)
        session = AgentSession(
            SessionSettings(
                network=network,
                node_name=name,
                batch_tokens=1,
                identity=identity or NodeIdentity.generate(),
            ),
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
    pair = ReplicaPair(*replicas, presences=presences)
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


async def listed(network: NetworkServer) -> dict[str, admin_pb.Node]:
    """The nodes ``network`` lists, by id."""
    async with channels.insecure_channel(network.target) as channel:
        response = await admin_grpc.NodeAdminServiceStub(channel).ListNodes(
            admin_pb.ListNodesRequest(), metadata=network.service
        )
    return {node.node_id: node for node in response.nodes}


async def published(pair: ReplicaPair, node_id: str) -> NodePresence:
    """The node's presence record, as every replica reads it."""
    [record] = [r for r in await pair.presences[0].snapshot() if r.node_id == node_id]
    return record


def admin(channel: grpc.aio.Channel) -> admin_grpc.NodeAdminServiceAsyncStub:
    return admin_grpc.NodeAdminServiceStub(channel)


class NodeAdminScenarios:
    """An operator's view and actions through replica A on a node connected to B."""

    async def test_a_node_of_the_other_replica_is_listed_got_and_drained_through_this_one(
        self, pair: ReplicaPair
    ) -> None:
        session, _ = await pair.agent(pair.b.target, "on-b")
        node_id = str(session.node_id)
        await eventually(lambda: ready_nodes(pair.a) == 1)

        nodes = await listed(pair.a)
        assert list(nodes) == [node_id]
        remote = nodes[node_id]
        assert (remote.node_name, remote.replica_id, remote.state) == (
            "on-b",
            "replica-b",
            admin_pb.NODE_STATE_READY,
        )
        assert list(remote.models) == [MODEL_ID]
        owner_view = (await listed(pair.b))[node_id]
        assert (owner_view.replica_id, owner_view.agent_version) == (
            "replica-b",
            remote.agent_version,
        )
        async with channels.insecure_channel(pair.a.target) as channel:
            got = await admin(channel).GetNode(
                admin_pb.GetNodeRequest(node_id=node_id), metadata=pair.a.service
            )
            assert got.node == remote
            drained = await admin(channel).DrainNode(
                admin_pb.DrainNodeRequest(node_id=node_id), metadata=pair.a.service
            )

        assert drained.node.state == admin_pb.NODE_STATE_DRAINING
        # Carried out by the replica holding the session, which it keeps; shown by
        # this one at once, by every replica once the owner's presence carries it.
        owned = pair.b.component.service.node(node_id)
        assert owned.draining
        assert session.connected.is_set()
        assert (await listed(pair.a))[node_id].state == admin_pb.NODE_STATE_DRAINING
        await until(
            lambda: published(pair, node_id), lambda record: record.state is NodeState.DRAINING
        )

    async def test_a_node_of_the_other_replica_is_quarantined_and_released_through_this_one(
        self, pair: ReplicaPair
    ) -> None:
        identity = NodeIdentity.generate()
        session, runtime = await pair.agent(pair.b.target, "on-b", identity)
        node_id = str(session.node_id)
        await eventually(lambda: ready_nodes(pair.a) == 1)
        async with channels.insecure_channel(pair.a.target) as channel:
            quarantined = await admin(channel).QuarantineNode(
                admin_pb.QuarantineNodeRequest(node_id=node_id, reason="under review"),
                metadata=pair.a.service,
            )
        assert quarantined.node.state == admin_pb.NODE_STATE_QUARANTINED
        assert quarantined.node.quarantine_reason == "under review"
        owned = pair.b.component.service.node(node_id)
        assert owned.standing.quarantine_reason == "under review"

        # No new job reaches it: the job finds no node.
        job = JobStream(pair.a, "job-after-quarantine")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(job.task, timeout=30)
        info = error_info(refused.value)
        assert info is not None
        assert info.reason == "NO_CAPACITY"
        assert runtime.started_jobs == []
        # Stored before the call returned: joining again, anywhere, is refused.
        for network in (pair.a, pair.b):
            _, responses, error = await open_raw_session(
                network.target,
                lambda challenge: [signed_hello(identity, _hello("on-b"), challenge, "")],
            )
            assert responses == []
            assert error is not None
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info(error)
            assert info is not None
            assert info.reason == "NODE_QUARANTINED"
        record = await until(
            lambda: published(pair, node_id),
            lambda record: record.state is NodeState.QUARANTINED,
        )
        assert record.quarantine_reason == "under review"

        async with channels.insecure_channel(pair.a.target) as channel:
            released = await admin(channel).ReleaseNode(
                admin_pb.ReleaseNodeRequest(node_id=node_id), metadata=pair.a.service
            )
        assert released.node.state == admin_pb.NODE_STATE_READY
        assert released.node.quarantine_reason == ""
        assert not owned.standing.quarantine_reason
        job = JobStream(pair.a, "job-after-release")
        await asyncio.wait_for(job.task, timeout=30)
        assert job.text == SCRIPT

    async def test_an_action_on_a_node_of_a_replica_that_cannot_be_reached_is_unavailable(
        self, pair: ReplicaPair
    ) -> None:
        # A replica that published its node and then stopped answering (nothing
        # listens at its address); its record has not lapsed yet.
        now = time.time()
        gone = NodePresence(
            node_id="node-of-a-gone-replica",
            replica_id="replica-gone",
            replica_address=f"127.0.0.1:{free_port()}",
            state=NodeState.READY,
            models=(MODEL_ID,),
            region="",
            operator_account_id="",
            reputation=1.0,
            verified=False,
            active_jobs=0,
            max_concurrent_jobs=1,
            recent_tokens_per_second=0.0,
            connected_at=now,
            published_at=now,
            expires_at=now + 600,
            node_name="stranded",
        )
        await pair.presences[0].publish([gone])
        await until(lambda: listed(pair.a), lambda nodes: gone.node_id in nodes)

        async with channels.insecure_channel(pair.a.target) as channel:
            stub = admin(channel)
            actions = {
                "drain": stub.DrainNode(
                    admin_pb.DrainNodeRequest(node_id=gone.node_id), metadata=pair.a.service
                ),
                "quarantine": stub.QuarantineNode(
                    admin_pb.QuarantineNodeRequest(node_id=gone.node_id),
                    metadata=pair.a.service,
                ),
                "release": stub.ReleaseNode(
                    admin_pb.ReleaseNodeRequest(node_id=gone.node_id), metadata=pair.a.service
                ),
            }
            for name, call in actions.items():
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, name
                info = error_info(failed.value)
                assert info is not None
                assert info.reason == "REPLICA_UNREACHABLE", name
                assert info.metadata["replica_id"] == "replica-gone"
        # Nothing was applied, not even in this replica's view.
        assert (await listed(pair.a))[gone.node_id].state == admin_pb.NODE_STATE_READY


def _hello(name: str) -> agent_pb.Hello:
    return agent_pb.Hello(
        node_name=name,
        agent_version=AGENT_VERSION,
        models=[agent_pb.ServedModel(model=MODEL_ID, runtime="scripted", context_length=2048)],
        max_concurrent_jobs=1,
    )
