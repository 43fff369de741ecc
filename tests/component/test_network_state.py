"""The network's state in PostgreSQL: a restarted network keeps its nodes' standings
and its configuration, job records tell how each job went, and configuration
acknowledgements are listed (API and `resultity nodes acks`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION
from core import channels
from core.grpc_errors import error_info
from server.cli import _parser
from server.common.bus_memory import MemoryBus
from server.network.cli import run_command
from server.network.service import ValidationSettings
from tests.component.test_node_validation import WRONG, Nodes, _run_job
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime, canary_answers
from tests.harness import (
    NetworkServer,
    Platform,
    RunningAgent,
    eventually,
    open_raw_session,
    running_platform,
    start_network,
)

LONG_SCRIPT = " ".join(f"w{i}" for i in range(60))


def _network_id(network: NetworkServer | Platform) -> str:
    component = network.component if isinstance(network, NetworkServer) else network.network
    return component.service.admission.settings.network_id


async def _get_node(network: NetworkServer, node_id: str) -> admin_pb.Node:
    async with channels.insecure_channel(network.target) as channel:
        response = await admin_grpc.NodeAdminServiceStub(channel).GetNode(
            admin_pb.GetNodeRequest(node_id=node_id), metadata=network.service
        )
    return response.node


async def _update_config(network: NetworkServer, interval_s: float) -> agent_pb.NetworkConfig:
    async with channels.insecure_channel(network.target) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        get = admin_pb.GetNetworkConfigRequest()
        config = (await admin.GetNetworkConfig(get, metadata=network.service)).config
        config.heartbeat_interval.CopyFrom(duration_pb2.Duration(seconds=int(interval_s)))
        config.canary_rate = 0.0
        response = await admin.UpdateNetworkConfig(
            admin_pb.UpdateNetworkConfigRequest(config=config, expected_version=config.version),
            metadata=network.service,
        )
    return response.config


async def _acks(network: NetworkServer, version: int = 0) -> admin_pb.ListConfigAcksResponse:
    async with channels.insecure_channel(network.target) as channel:
        return await admin_grpc.NodeAdminServiceStub(channel).ListConfigAcks(
            admin_pb.ListConfigAcksRequest(version=version), metadata=network.service
        )


def _hello(name: str) -> agent_pb.Hello:
    return agent_pb.Hello(
        node_name=name,
        agent_version=AGENT_VERSION,
        models=[agent_pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
        max_concurrent_jobs=1,
    )


async def test_a_restarted_network_keeps_standings_configuration_and_acks(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    validation = ValidationSettings(canary_rate=1.0)
    network = await start_network(postgres_dsn, validation=validation)
    network_id = _network_id(network)
    steady_id, flaky_id, held_id = (NodeIdentity.generate() for _ in range(3))
    nodes = Nodes(network)
    try:
        # A node that later answers a disguised canary wrongly: reputation down, unverified.
        flaky_runtime = ScriptedRuntime(answers=canary_answers())
        flaky = await nodes.start("flaky", flaky_runtime, flaky_id)
        await eventually(lambda: not network.component.service.node(flaky).validating)
        flaky_runtime.answers = dict(WRONG)
        await _run_job(network)
        service = network.component.service
        await eventually(lambda: service.node(flaky).standing.reputation < 1.0)
        reputation = service.node(flaky).standing.reputation
        assert service.node(flaky).standing.failed_canary

        held = await nodes.start("held", ScriptedRuntime(answers=canary_answers()), held_id)
        steady = await nodes.start("steady", ScriptedRuntime(answers=canary_answers()), steady_id)
        await eventually(lambda: not service.node(steady).validating)
        async with channels.insecure_channel(network.target) as channel:
            await admin_grpc.NodeAdminServiceStub(channel).QuarantineNode(
                admin_pb.QuarantineNodeRequest(node_id=held, reason="under review"),
                metadata=network.service,
            )
        config = await _update_config(network, interval_s=7)
        assert config.version == 2
        await eventually(lambda: all(n.config_version == 2 for n in service.nodes()))
    finally:
        await nodes.stop()
        await network.stop()

    restarted = await start_network(postgres_dsn, validation=validation, network_id=network_id)
    nodes = Nodes(restarted)
    try:
        # The configuration is the stored version, not the settings' first one.
        current = restarted.component.service.config
        assert (current.version, current.heartbeat_interval_s, current.canary_rate) == (
            2,
            7.0,
            0.0,
        )
        # The quarantined node is still refused at hello.
        _, responses, refused = await open_raw_session(
            restarted.target,
            lambda challenge: [signed_hello(held_id, _hello("held"), challenge, "")],
        )
        assert responses == []
        assert refused is not None
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(refused)
        assert info is not None
        assert info.reason == "NODE_QUARANTINED"
        assert "under review" in (refused.details() or "")

        # The others come back as they were.
        flaky_runtime = ScriptedRuntime(answers=canary_answers())
        assert await nodes.start("flaky", flaky_runtime, flaky_id) == flaky
        steady_runtime = ScriptedRuntime(answers=canary_answers())
        assert await nodes.start("steady", steady_runtime, steady_id) == steady
        service = restarted.component.service
        await eventually(lambda: all(not n.validating for n in service.nodes()))
        flaky_node, steady_node = (
            await _get_node(restarted, flaky),
            await _get_node(restarted, steady),
        )
        assert flaky_node.reputation == pytest.approx(reputation)
        assert steady_node.reputation == 1.0
        # The wrong answer stays on record: the node is not verified (verified_only rules).
        assert service.node(flaky).standing.failed_canary
        assert not service.node(steady).standing.failed_canary
        await eventually(lambda: all(n.config_version == 2 for n in service.nodes()))

        # Who acknowledged version 2: every node that ran it, before and after the restart.
        listed = await _acks(restarted)
        assert listed.version == 2
        assert {ack.node_id for ack in listed.acks} == {flaky, held, steady}
        assert all(ack.version == 2 and ack.acked_at.seconds for ack in listed.acks)
        first = await _acks(restarted, version=1)
        assert {ack.node_id for ack in first.acks} == {flaky, held, steady}
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await _acks(restarted, version=99)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", restarted.service_token)
        await run_command(_parser().parse_args(["nodes", "--network", restarted.target, "acks"]))
        printed = capsys.readouterr().out
        assert "version 2" in printed
        assert all(node_id in printed for node_id in (flaky, held, steady))
    finally:
        await nodes.stop()
        await restarted.stop()


def _serving(platform: Platform) -> RunningAgent:
    """The agent whose node runs a job now."""
    busy = {node.node_id for node in platform.network.service.nodes() if node.active_jobs}
    [agent] = [agent for agent in platform.agents if agent.session.node_id in busy]
    return agent


async def _job_rows(dsn: str, network_id: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT *, assignments::text AS assignments FROM network_jobs
               WHERE network_id = $1 ORDER BY created_at""",
            network_id,
        )
    finally:
        await conn.close()
    return [dict(row) | {"assignments": json.loads(row["assignments"])} for row in rows]


async def test_a_model_keeps_the_time_it_entered_the_catalog(postgres_dsn: str) -> None:
    network = await start_network(postgres_dsn)
    network_id = _network_id(network)
    try:
        [model] = network.component.service.models()
    finally:
        await network.stop()
    assert model.created is not None

    restarted = await start_network(postgres_dsn, network_id=network_id)
    other = await start_network(postgres_dsn)
    try:
        [again] = restarted.component.service.models()
        [elsewhere] = other.component.service.models()
    finally:
        await restarted.stop()
        await other.stop()
    assert again.created == model.created
    # Another network's catalog is its own: the model entered it later.
    assert elsewhere.created is not None
    assert elsewhere.created > model.created


async def test_job_records_tell_how_each_job_went(postgres_dsn: str) -> None:
    async with running_platform(postgres_dsn) as platform:
        for name in ("a", "b"):
            runtime = ScriptedRuntime(script=LONG_SCRIPT, token_delay_s=0.005)
            await platform.start_agent(runtime, name=name)
        customer = await platform.customer(credits=1_000_000)
        params = pb.ChatCompletionParams(
            model=MODEL_ID,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
        )

        async def stream(request_id: str, *, kill_after: int = 0, leave_after: int = 0) -> None:
            parts = 0
            call = platform.inference.StreamChatCompletion(
                pb.StreamChatCompletionRequest(params=params),
                metadata=(*customer.metadata, ("x-request-id", request_id)),
            )
            async for message in call:
                if message.choices and message.choices[0].content:
                    parts += 1
                    if parts == kill_after:
                        await _serving(platform).stop()
                    if parts == leave_after:
                        call.cancel()
                        return

        await stream("req-finished")
        await stream("req-moved", kill_after=5)
        await stream("req-left", leave_after=3)

        network_id = _network_id(platform)

        # Records are written behind the jobs: wait for the last outcomes to land.
        async with asyncio.timeout(10):
            while True:
                rows = await _job_rows(postgres_dsn, network_id)
                if len(rows) == 3 and all(row["outcome"] != "running" for row in rows):
                    break
                await asyncio.sleep(0.02)
        by_request = {row["request_id"]: row for row in rows}
        assert set(by_request) == {"req-finished", "req-moved", "req-left"}
        for row in rows:
            assert row["account_id"] == customer.account_id
            assert (row["subcloud_id"], row["model"]) == ("", MODEL_ID)
            assert row["created_at"] <= row["first_token_at"] <= row["finished_at"]

        finished = by_request["req-finished"]
        assert (finished["outcome"], finished["detail"]) == ("finished", "stop")
        assert (finished["prompt_tokens"], finished["completion_tokens"]) == (4, 60)
        assert [a["epoch"] for a in finished["assignments"]] == [1]

        moved = by_request["req-moved"]
        assert (moved["outcome"], moved["completion_tokens"]) == ("finished", 60)
        assert [a["epoch"] for a in moved["assignments"]] == [1, 2]
        assert moved["assignments"][0]["node_id"] != moved["assignments"][1]["node_id"]
        assert all(a["operator_account_id"] for a in moved["assignments"])

        left = by_request["req-left"]
        assert left["outcome"] == "cancelled"
        assert 3 <= left["completion_tokens"] < 60


async def test_a_configuration_change_on_one_replica_reaches_agents_of_another(
    postgres_dsn: str,
) -> None:
    bus = MemoryBus()
    first = await start_network(postgres_dsn, bus=bus)
    network_id = _network_id(first)
    second = await start_network(postgres_dsn, bus=bus, network_id=network_id)
    nodes = Nodes(second)
    try:
        node_id = await nodes.start("far", ScriptedRuntime())
        config = await _update_config(first, interval_s=9)
        assert config.version == 2
        service = second.component.service
        await eventually(lambda: service.node(node_id).config_version == 2)
        assert service.config.heartbeat_interval_s == 9.0
        # Acknowledged on the second replica, listed by the first once written there.
        async with asyncio.timeout(10):
            while not (listed := await _acks(first, version=2)).acks:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert [ack.node_id for ack in listed.acks] == [node_id]
        # Each replica numbers from the store: a stale expectation is refused on either.
        with pytest.raises(grpc.aio.AioRpcError) as stale:
            await _update_config_expecting(second, expected_version=1)
        assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await nodes.stop()
        await second.stop()
        await first.stop()
        await bus.close()


async def _update_config_expecting(network: NetworkServer, expected_version: int) -> None:
    async with channels.insecure_channel(network.target) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        get = admin_pb.GetNetworkConfigRequest()
        config = (await admin.GetNetworkConfig(get, metadata=network.service)).config
        await admin.UpdateNetworkConfig(
            admin_pb.UpdateNetworkConfigRequest(config=config, expected_version=expected_version),
            metadata=network.service,
        )


async def test_a_node_released_on_one_replica_serves_at_once_on_the_other(
    postgres_dsn: str,
) -> None:
    bus = MemoryBus()
    first = await start_network(postgres_dsn, bus=bus)
    second = await start_network(postgres_dsn, bus=bus, network_id=_network_id(first))
    nodes = Nodes(second)
    try:
        node_id = await nodes.start("far", ScriptedRuntime())
        async with channels.insecure_channel(second.target) as channel:
            await admin_grpc.NodeAdminServiceStub(channel).QuarantineNode(
                admin_pb.QuarantineNodeRequest(node_id=node_id, reason="checking"),
                metadata=second.service,
            )
        # Released through the replica the node is not connected to.
        async with channels.insecure_channel(first.target) as channel:
            released = await admin_grpc.NodeAdminServiceStub(channel).ReleaseNode(
                admin_pb.ReleaseNodeRequest(node_id=node_id), metadata=first.service
            )
        assert not released.HasField("node")
        service = second.component.service
        await eventually(lambda: not service.node(node_id).standing.quarantine_reason)
        assert await _run_job(second) == node_id
    finally:
        await nodes.stop()
        await second.stop()
        await first.stop()
        await bus.close()
