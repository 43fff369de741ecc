"""Two network replicas as separate processes on one PostgreSQL and one Redis, with
an account server resolving node tokens and agents as processes: a configuration
change made on one replica is acknowledged by an agent connected to the other, a
node connected to one is listed and drained through the other, and a replica
killed and restarted keeps what it knew of its nodes: a quarantined node stays
refused, the others come back with their standing, the configuration stays the
version last stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION
from core import channels
from core.grpc_errors import error_info
from server.network.catalog import SMOLLM2_135M
from tests.harness import open_raw_session
from tests.integration.scaled_out import ScaledOut, scaled_out

pytestmark = pytest.mark.integration

# Bounds a broken test (waits poll), not the platform's latency.
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
async def platform(
    tmp_path_factory: pytest.TempPathFactory, integration_database: str, redis_url: str
) -> AsyncIterator[ScaledOut]:
    logs = Path(tmp_path_factory.mktemp("network-replicas"))
    async with scaled_out(logs, integration_database, redis_url, networks=2, replicas=0) as running:
        yield running


async def _ready(platform: ScaledOut, network: int, name: str) -> admin_pb.Node:
    """The node ``name`` once it serves through replica ``network`` (joined there)."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            for node in await platform.nodes_of(network):
                if node.node_name == name and node.state == admin_pb.NODE_STATE_READY:
                    return node
            await asyncio.sleep(0.2)


async def test_a_config_change_on_one_replica_is_acked_by_an_agent_on_the_other(
    platform: ScaledOut,
) -> None:
    await platform.agent("far", homes=(1,))
    far = await _ready(platform, 1, "far")
    async with channels.insecure_channel(platform.networks[0]) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        get = admin_pb.GetNetworkConfigRequest()
        config = (await admin.GetNetworkConfig(get, metadata=platform.service)).config
        config.heartbeat_interval.CopyFrom(duration_pb2.Duration(seconds=3))
        updated = await admin.UpdateNetworkConfig(
            admin_pb.UpdateNetworkConfigRequest(config=config, expected_version=config.version),
            metadata=platform.service,
        )
        version = updated.config.version
        # Pushed by the second replica, acknowledged there, listed by the first.
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                listed = await admin.ListConfigAcks(
                    admin_pb.ListConfigAcksRequest(version=version), metadata=platform.service
                )
                if listed.acks:
                    break
                await asyncio.sleep(0.05)
    assert [ack.node_id for ack in listed.acks] == [far.node_id]
    [node] = [n for n in await platform.nodes_of(1) if n.node_name == "far"]
    assert node.config_version == version


async def test_a_node_on_one_replica_is_listed_and_drained_through_the_other(
    platform: ScaledOut,
) -> None:
    await platform.agent("drained", homes=(1,))
    node = await _ready(platform, 1, "drained")
    async with channels.insecure_channel(platform.networks[0]) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                listed = await admin.ListNodes(
                    admin_pb.ListNodesRequest(), metadata=platform.service
                )
                if node.node_id in {n.node_id for n in listed.nodes}:
                    break
                await asyncio.sleep(0.2)
        [remote] = [n for n in listed.nodes if n.node_id == node.node_id]
        assert (remote.node_name, remote.replica_id, remote.operator_account_id) == (
            "drained",
            "network-1",
            node.operator_account_id,
        )
        drained = await admin.DrainNode(
            admin_pb.DrainNodeRequest(node_id=node.node_id), metadata=platform.service
        )
    assert drained.node.state == admin_pb.NODE_STATE_DRAINING
    # Carried out by the replica holding the session: the node stays connected there.
    [owned] = [n for n in await platform.nodes_of(1) if n.node_id == node.node_id]
    assert owned.state == admin_pb.NODE_STATE_DRAINING


async def test_a_restarted_replica_keeps_a_quarantine_standings_and_its_configuration(
    platform: ScaledOut,
) -> None:
    held = await platform.agent("held", homes=(0,))
    await platform.agent("steady", homes=(0,))
    held_node = await _ready(platform, 0, "held")
    steady = await _ready(platform, 0, "steady")
    assert steady.verified
    async with channels.insecure_channel(platform.networks[0]) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        await admin.QuarantineNode(
            admin_pb.QuarantineNodeRequest(node_id=held_node.node_id, reason="under review"),
            metadata=platform.service,
        )
        config = (
            await admin.GetNetworkConfig(
                admin_pb.GetNetworkConfigRequest(), metadata=platform.service
            )
        ).config
    await platform.processes.kill("held")

    await platform.processes.kill("network-0")
    await platform.restart("network-0")

    # The steady node reconnects to the restarted replica as it was.
    back = await _ready(platform, 0, "steady")
    assert back.node_id == steady.node_id
    assert (back.reputation, back.verified, back.operator_account_id, back.quarantine_reason) == (
        steady.reputation,
        steady.verified,
        steady.operator_account_id,
        "",
    )
    assert back.config_version == config.version
    async with channels.insecure_channel(platform.networks[0]) as channel:
        stored = (
            await admin_grpc.NodeAdminServiceStub(channel).GetNetworkConfig(
                admin_pb.GetNetworkConfigRequest(), metadata=platform.service
            )
        ).config
    assert stored == config

    # The quarantined node is refused at hello, by the restarted replica and the other.
    identity = NodeIdentity.load_or_create(held.data_dir)
    hello = agent_pb.Hello(
        node_name="held",
        agent_version=AGENT_VERSION,
        models=[
            agent_pb.ServedModel(model=SMOLLM2_135M.id, runtime="scripted", context_length=2048)
        ],
        max_concurrent_jobs=1,
    )
    for target in platform.networks:
        _, responses, refused = await open_raw_session(
            target,
            lambda challenge: [signed_hello(identity, hello, challenge, held.node_token)],
        )
        assert responses == []
        assert refused is not None
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(refused)
        assert info is not None
        assert info.reason == "NODE_QUARANTINED"
        assert "under review" in (refused.details() or "")
