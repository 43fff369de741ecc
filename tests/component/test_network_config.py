"""The versioned network configuration over real gRPC: pushed to connected agents,
applied without reconnecting (heartbeat interval) and acknowledged; its timings
also drive the network's own liveness checks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION, AgentSession, SessionSettings
from core import channels
from core.grpc_errors import error_info
from server.network.service import LivenessSettings
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import NetworkServer, eventually, start_network

# So slow that no heartbeat, and no liveness verdict, comes during a test
# unless a pushed configuration shortens them.
SLOW = LivenessSettings(heartbeat_interval_s=1000.0, heartbeat_timeout_s=3000.0)


@pytest.fixture
async def network(postgres_dsn: str) -> AsyncIterator[NetworkServer]:
    server = await start_network(postgres_dsn, liveness=SLOW)
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def _agent(target: str, name: str) -> AsyncIterator[AgentSession]:
    session = AgentSession(SessionSettings(target, name), ScriptedRuntime())
    task = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        yield session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _push(
    network: NetworkServer, interval_s: float, timeout_s: float, expected_version: int
) -> agent_pb.NetworkConfig:
    async with channels.insecure_channel(network.target) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        request = admin_pb.GetNetworkConfigRequest()
        config = (await admin.GetNetworkConfig(request, metadata=network.service)).config
        config.heartbeat_interval.CopyFrom(_duration(interval_s))
        config.heartbeat_timeout.CopyFrom(_duration(timeout_s))
        response = await admin.UpdateNetworkConfig(
            admin_pb.UpdateNetworkConfigRequest(config=config, expected_version=expected_version),
            metadata=network.service,
        )
    return response.config


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


async def test_pushed_config_changes_the_heartbeat_interval_without_reconnecting(
    network: NetworkServer,
) -> None:
    service = network.component.service
    async with _agent(network.target, "beating") as session:
        assert session.node_id is not None
        node = service.node(session.node_id)
        await eventually(lambda: node.config_version == 1)
        assert session.heartbeat_interval_s == SLOW.heartbeat_interval_s
        registered_at = node.last_heartbeat_at

        pushed = await _push(network, 0.05, SLOW.heartbeat_timeout_s, expected_version=1)
        assert pushed.version == 2
        # Applied and acknowledged on the same session.
        await eventually(lambda: node.config_version == 2)
        assert session.heartbeat_interval_s == 0.05
        # Heartbeats now come at the new interval; at the old one, the first
        # would be 1000 s away.
        await eventually(lambda: node.last_heartbeat_at > registered_at)
        assert service.nodes() == [node]
        assert service.node(session.node_id) is node


async def test_new_sessions_are_welcomed_with_the_pushed_timings(network: NetworkServer) -> None:
    await _push(network, 0.05, 0.5, expected_version=0)
    async with _agent(network.target, "late") as session:
        assert session.heartbeat_interval_s == 0.05


async def test_pushed_timeout_drops_a_silent_node(network: NetworkServer) -> None:
    """A node that never heartbeats outlives the slow timeout, not a pushed short one."""
    await _push(network, 0.05, 0.3, expected_version=1)
    outbound: asyncio.Queue[agent_pb.ConnectRequest] = asyncio.Queue()

    async def silent() -> AsyncIterator[agent_pb.ConnectRequest]:
        while True:
            yield await outbound.get()

    hello = agent_pb.Hello(
        node_name="silent",
        agent_version=AGENT_VERSION,
        models=[agent_pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
        max_concurrent_jobs=1,
    )
    async with channels.insecure_channel(network.target) as channel:
        call = agent_grpc.AgentServiceStub(channel).Connect(silent())
        responses = aiter(call)
        challenge = (await anext(responses)).challenge
        outbound.put_nowait(signed_hello(NodeIdentity.generate(), hello, challenge, ""))
        assert (await anext(responses)).welcome.heartbeat_timeout.ToMilliseconds() == 300
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in responses:
                pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(ended.value)
    assert info is not None
    assert info.reason == "SESSION_ENDED"
    assert "heartbeat timeout" in (ended.value.details() or "")


async def test_update_against_a_stale_version_is_refused(network: NetworkServer) -> None:
    await _push(network, 5.0, 30.0, expected_version=1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _push(network, 1.0, 10.0, expected_version=1)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
