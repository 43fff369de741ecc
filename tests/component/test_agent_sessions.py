"""Node sessions over real gRPC: registration, liveness, protocol, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.backoff import Backoff
from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION, AgentSession, SessionSettings
from core import channels
from core.grpc_errors import error_info
from core.metadata import bearer_metadata
from server.common.credentials import generate_service_token
from server.network.component import NetworkComponent
from server.network.service import LivenessSettings
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import Opening, eventually, open_raw_session, start_network

FAST = LivenessSettings(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)
SERVICE_TOKEN = generate_service_token()


async def _network_server(
    dsn: str, liveness: LivenessSettings, port: int = 0, network_id: str = ""
) -> tuple[grpc.aio.Server, NetworkComponent, int]:
    network = await start_network(
        dsn, liveness=liveness, port=port, network_id=network_id, service_token=SERVICE_TOKEN
    )
    return network.server, network.component, network.port


@pytest.fixture
async def network(postgres_dsn: str) -> AsyncIterator[tuple[NetworkComponent, str]]:
    server, component, port = await _network_server(postgres_dsn, FAST)
    yield component, f"127.0.0.1:{port}"
    await server.stop(None)
    await component.stop()


def _hello(model: str = MODEL_ID) -> Opening:
    hello = pb.Hello(
        node_name="raw",
        agent_version=AGENT_VERSION,
        models=[pb.ServedModel(model=model, runtime="scripted", context_length=2048)],
        max_concurrent_jobs=1,
    )
    identity = NodeIdentity.generate()
    return lambda challenge: [signed_hello(identity, hello, challenge, "")]


def _info(error: grpc.aio.AioRpcError) -> ErrorInfo:
    info = error_info(error)
    assert info is not None
    return info


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_hello_is_welcomed_with_the_heartbeat_timing(
    network: tuple[NetworkComponent, str],
) -> None:
    _, target = network
    async with asyncio.timeout(10):
        _, responses, error = await open_raw_session(target, _hello(), keep_open=True)
    welcome = responses[0].welcome
    assert welcome.node_id
    assert welcome.heartbeat_interval.ToMilliseconds() == 50
    assert welcome.heartbeat_timeout.ToMilliseconds() == 300
    # A node that never heartbeats is dropped and told why.
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _info(error).reason == "SESSION_ENDED"


async def test_first_message_must_be_a_signed_hello(
    network: tuple[NetworkComponent, str],
) -> None:
    _, target = network
    beat = pb.ConnectRequest(heartbeat=pb.Heartbeat())
    _, _, error = await open_raw_session(target, lambda _: [beat])
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _info(error).reason == "INVALID_NODE_CREDENTIALS"


async def test_node_without_a_catalog_model_is_refused(
    network: tuple[NetworkComponent, str],
) -> None:
    _, target = network
    _, _, error = await open_raw_session(target, _hello("unknown-model"))
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _info(error).metadata["field"] == "models"


async def test_closed_stream_removes_the_node_at_once(
    network: tuple[NetworkComponent, str],
) -> None:
    component, target = network
    _, responses, _ = await open_raw_session(target, _hello())
    assert responses[0].welcome.node_id
    await eventually(lambda: not component.service.nodes())


async def test_heartbeating_agent_stays_and_is_listed(
    network: tuple[NetworkComponent, str],
) -> None:
    _, target = network
    session = AgentSession(SessionSettings(target, "listed", region="eu-west"), ScriptedRuntime())
    task = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        # Several timeouts' worth of time: heartbeats keep it registered.
        await asyncio.sleep(FAST.heartbeat_timeout_s * 4)
        async with channels.insecure_channel(target) as channel:
            listing = await admin_grpc.NodeAdminServiceStub(channel).ListNodes(
                admin_pb.ListNodesRequest(), metadata=bearer_metadata(SERVICE_TOKEN)
            )
        assert [node.node_id for node in listing.nodes] == [session.node_id]
        assert listing.nodes[0].models == [MODEL_ID]
        assert listing.nodes[0].node_name == "listed"
        assert listing.nodes[0].region == "eu-west"
    finally:
        await _cancel(task)


async def test_agent_reconnects_after_the_network_server_restarts(postgres_dsn: str) -> None:
    server, component, port = await _network_server(postgres_dsn, FAST)
    session = AgentSession(
        SessionSettings(f"127.0.0.1:{port}", "phoenix"),
        ScriptedRuntime(),
        backoff=Backoff(base_s=0.05, cap_s=0.2),
    )
    task = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        first_id = session.node_id
        await server.stop(None)
        await component.stop()
        await eventually(lambda: not session.connected.is_set())

        network_id = component.service.admission.settings.network_id
        server, component, _ = await _network_server(postgres_dsn, FAST, port, network_id)
        await eventually(lambda: bool(component.service.nodes()))
        # The node's id is its key's fingerprint: the same across sessions.
        assert session.node_id == first_id
        assert [node.node_id for node in component.service.nodes()] == [session.node_id]
    finally:
        await _cancel(task)
        await server.stop(None)
        await component.stop()
