"""Only the platform's service token opens the network's dispatch API; the node admin
API also takes admin keys, and an operator's management key reads that operator's
nodes, on whichever network replica they are connected. Agents keep
authenticating their own stream with node tokens."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc
from resultity.network.v1 import replica_service_pb2 as replica_pb
from resultity.network.v1 import replica_service_pb2_grpc as replica_grpc

from agent.backoff import Backoff
from agent.session import AgentSession, SessionSettings
from core import channels
from core.convert.generation import spec_to_pb
from core.grpc_errors import error_info
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.metadata import bearer_metadata
from server.common.credentials import generate_service_token
from server.network.presence import InProcessPresence
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import (
    NetworkServer,
    Platform,
    eventually,
    running_platform,
    start_network,
    until,
)
from tests.replica_scenarios import LIVENESS

Metadata = tuple[tuple[str, str], ...]
SPEC = spec_to_pb(
    GenerationSpec(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "hello"),),
        sampling=Sampling(max_tokens=3),
        max_prompt_tokens=100,
    )
)


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as platform:
        yield platform


def _calls(channel: grpc.aio.Channel) -> dict[str, Callable[[Metadata], Awaitable[Any]]]:
    """Every dispatch and node admin RPC, called with the given metadata."""
    dispatch = dispatch_grpc.DispatchServiceStub(channel)
    admin = admin_grpc.NodeAdminServiceStub(channel)

    async def run_job(metadata: Metadata) -> list[dispatch_pb.RunJobResponse]:
        call = dispatch.RunJob(dispatch_pb.RunJobRequest(job_id="j", spec=SPEC), metadata=metadata)
        return [event async for event in call]

    return {
        "RunJob": run_job,
        "ListModels": lambda m: dispatch.ListModels(dispatch_pb.ListModelsRequest(), metadata=m),
        "GetJobRecords": lambda m: dispatch.GetJobRecords(
            dispatch_pb.GetJobRecordsRequest(job_ids=["j"]), metadata=m
        ),
        "ListJobRecords": lambda m: dispatch.ListJobRecords(
            dispatch_pb.ListJobRecordsRequest(), metadata=m
        ),
        "ListNodes": lambda m: admin.ListNodes(admin_pb.ListNodesRequest(), metadata=m),
        "GetNode": lambda m: admin.GetNode(admin_pb.GetNodeRequest(node_id="n"), metadata=m),
        "DrainNode": lambda m: admin.DrainNode(admin_pb.DrainNodeRequest(node_id="n"), metadata=m),
        "QuarantineNode": lambda m: admin.QuarantineNode(
            admin_pb.QuarantineNodeRequest(node_id="n"), metadata=m
        ),
        "ReleaseNode": lambda m: admin.ReleaseNode(
            admin_pb.ReleaseNodeRequest(node_id="n"), metadata=m
        ),
        "GetNetworkConfig": lambda m: admin.GetNetworkConfig(
            admin_pb.GetNetworkConfigRequest(), metadata=m
        ),
        "UpdateNetworkConfig": lambda m: admin.UpdateNetworkConfig(
            admin_pb.UpdateNetworkConfigRequest(), metadata=m
        ),
    }


async def test_callers_without_the_service_token_are_refused(platform: Platform) -> None:
    _, node_token = await platform.operator()
    customer = await platform.customer(credits=1_000_000)
    agent = await platform.start_agent(ScriptedRuntime())
    strangers: dict[str, Metadata] = {
        "no credentials": (),
        "not bearer": (("authorization", "Basic abc"),),
        "another service token": bearer_metadata(generate_service_token()),
        "a customer's API key": customer.metadata,
        "a node token": bearer_metadata(node_token),
    }
    async with channels.insecure_channel(platform.target) as channel:
        for name, call in _calls(channel).items():
            for who, metadata in strangers.items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(metadata)
                info = error_info(refused.value)
                assert info is not None
                # The node admin API resolves API keys: an inference key or a node
                # token is known but has no right there.
                if who in {"a customer's API key", "a node token"} and name not in _DISPATCH:
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
                    continue
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, who)
                assert info.reason == "INVALID_API_KEY", (name, who)
    # Nothing reached the node, nothing changed.
    assert agent.runtime.started_jobs == []  # type: ignore[attr-defined]
    [node] = platform.network.service.nodes()
    assert not node.draining
    assert not node.standing.quarantine_reason
    assert platform.network.service.config.version == 1


_DISPATCH = {"RunJob", "ListModels", "GetJobRecords", "ListJobRecords"}


async def _key(platform: Platform, account_id: str, scope: int) -> Metadata:
    issued = await keys_grpc.ApiKeyServiceStub(platform.channel).CreateApiKey(
        keys_pb.CreateApiKeyRequest(account_id=account_id, name="console", scopes=[scope]),
        metadata=platform.service,
    )
    return bearer_metadata(issued.secret)


async def test_an_operator_key_reads_only_its_own_nodes_and_an_admin_key_all(
    platform: Platform,
) -> None:
    ada, ada_token = await platform.operator()
    bob, bob_token = await platform.operator()
    ada_node = (await platform.start_agent(ScriptedRuntime(), "ada", ada_token)).session.node_id
    bob_node = (await platform.start_agent(ScriptedRuntime(), "bob", bob_token)).session.node_id
    ada_key = await _key(platform, ada, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    admin_key = await _key(platform, bob, keys_pb.API_KEY_SCOPE_ADMIN)
    async with channels.insecure_channel(platform.target) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        mine = await admin.ListNodes(admin_pb.ListNodesRequest(), metadata=ada_key)
        assert [node.node_id for node in mine.nodes] == [ada_node]
        got = await admin.GetNode(admin_pb.GetNodeRequest(node_id=ada_node), metadata=ada_key)
        assert got.node.operator_account_id == ada
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await admin.GetNode(admin_pb.GetNodeRequest(node_id=bob_node), metadata=ada_key)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        for name, call in _calls(channel).items():
            if name in _DISPATCH or name in {"ListNodes", "GetNode"}:
                continue
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(ada_key)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        everyone = await admin.ListNodes(admin_pb.ListNodesRequest(), metadata=admin_key)
        assert {node.node_id for node in everyone.nodes} == {ada_node, bob_node}
        drained = await admin.DrainNode(
            admin_pb.DrainNodeRequest(node_id=ada_node), metadata=admin_key
        )
        assert drained.node.state == admin_pb.NODE_STATE_DRAINING
        # Keys never open the dispatch API.
        with pytest.raises(grpc.aio.AioRpcError) as dispatch_refused:
            await dispatch_grpc.DispatchServiceStub(channel).ListModels(
                dispatch_pb.ListModelsRequest(), metadata=admin_key
            )
        assert dispatch_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_service_token_opens_them(platform: Platform) -> None:
    agent = await platform.start_agent(ScriptedRuntime())
    node_id = agent.session.node_id
    async with channels.insecure_channel(platform.target) as channel:
        dispatch = dispatch_grpc.DispatchServiceStub(channel)
        admin = admin_grpc.NodeAdminServiceStub(channel)
        call = dispatch.RunJob(
            dispatch_pb.RunJobRequest(job_id="j", spec=SPEC), metadata=platform.service
        )
        events = [event async for event in call]
        assert events[-1].finished.usage.completion_tokens == 3
        records = await dispatch.GetJobRecords(
            dispatch_pb.GetJobRecordsRequest(job_ids=["j", "unknown"]), metadata=platform.service
        )
        [record] = records.records
        assert (record.job_id, record.usage.completion_tokens) == ("j", 3)
        assert [a.node_id for a in record.assignments] == [node_id]
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await dispatch.GetJobRecords(
                dispatch_pb.GetJobRecordsRequest(job_ids=[str(i) for i in range(129)]),
                metadata=platform.service,
            )
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        running = await dispatch.ListJobRecords(
            dispatch_pb.ListJobRecordsRequest(
                filter=dispatch_pb.JobRecordFilter(outcomes=[dispatch_pb.JOB_OUTCOME_FINISHED])
            ),
            metadata=platform.service,
        )
        assert [r.job_id for r in running.records] == ["j"]
        listed = await admin.ListNodes(admin_pb.ListNodesRequest(), metadata=platform.service)
        assert [node.node_id for node in listed.nodes] == [node_id]
        drained = await admin.DrainNode(
            admin_pb.DrainNodeRequest(node_id=node_id), metadata=platform.service
        )
        assert drained.node.state == admin_pb.NODE_STATE_DRAINING


async def test_an_operator_key_reads_its_nodes_on_another_replica_and_acts_on_none(
    postgres_dsn: str,
) -> None:
    presence = InProcessPresence()
    async with running_platform(postgres_dsn, liveness=LIVENESS, presence=presence) as platform:
        [(_, bearer)] = platform.service
        other = await start_network(
            postgres_dsn,
            liveness=LIVENESS,
            network_id=platform.network.service.admission.settings.network_id,
            service_token=bearer.removeprefix("Bearer "),
            replica_id="replica-b",
            presence=presence,
            account_target=platform.target,
        )
        agents: list[asyncio.Task[None]] = []
        try:
            ada, ada_token = await platform.operator()
            _, bob_token = await platform.operator()
            ada_node = await _agent_on(other, "ada", ada_token, agents)
            bob_node = await _agent_on(other, "bob", bob_token, agents)
            here = (await platform.start_agent(ScriptedRuntime(), "here")).session.node_id
            ada_key = await _key(platform, ada, keys_pb.API_KEY_SCOPE_MANAGEMENT)
            async with channels.insecure_channel(platform.target) as channel:
                admin = admin_grpc.NodeAdminServiceStub(channel)
                everyone = await until(
                    lambda: admin.ListNodes(admin_pb.ListNodesRequest(), metadata=platform.service),
                    lambda listed: len(listed.nodes) == 3,
                )
                assert {(n.node_id, n.replica_id) for n in everyone.nodes} == {
                    (ada_node, "replica-b"),
                    (bob_node, "replica-b"),
                    (here, "replica-a"),
                }
                mine = await admin.ListNodes(admin_pb.ListNodesRequest(), metadata=ada_key)
                assert [(n.node_id, n.operator_account_id) for n in mine.nodes] == [(ada_node, ada)]
                got = await admin.GetNode(
                    admin_pb.GetNodeRequest(node_id=ada_node), metadata=ada_key
                )
                assert (got.node.node_name, got.node.replica_id) == ("ada", "replica-b")
                with pytest.raises(grpc.aio.AioRpcError) as hidden:
                    await admin.GetNode(admin_pb.GetNodeRequest(node_id=bob_node), metadata=ada_key)
                assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
                # Even on its own node, a management key takes no action.
                for call in (
                    admin.DrainNode(admin_pb.DrainNodeRequest(node_id=ada_node), metadata=ada_key),
                    admin.QuarantineNode(
                        admin_pb.QuarantineNodeRequest(node_id=ada_node), metadata=ada_key
                    ),
                    admin.ReleaseNode(
                        admin_pb.ReleaseNodeRequest(node_id=ada_node), metadata=ada_key
                    ),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Between replicas only the service token passes, not even an admin key.
            admin_key = await _key(platform, ada, keys_pb.API_KEY_SCOPE_ADMIN)
            async with channels.insecure_channel(other.target) as channel:
                replica = replica_grpc.ReplicaServiceStub(channel)
                for key in (ada_key, admin_key):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await replica.AdministerNode(
                            replica_pb.AdministerNodeRequest(
                                node_id=ada_node, drain=replica_pb.NodeDrain()
                            ),
                            metadata=key,
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            held = other.component.service.node(ada_node)
            assert not held.draining
            assert not held.standing.quarantine_reason
        finally:
            for task in agents:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await other.stop()


async def _agent_on(
    network: NetworkServer, name: str, node_token: str, tasks: list[asyncio.Task[None]]
) -> str:
    """The id of a node of ``node_token``'s operator, connected to ``network``."""
    session = AgentSession(
        SessionSettings(network=network.target, node_name=name, node_token=node_token),
        ScriptedRuntime(),
        backoff=Backoff(base_s=0.05, cap_s=0.2),
    )
    tasks.append(asyncio.create_task(session.run_forever()))
    await eventually(lambda: session.connected.is_set())
    return str(session.node_id)
