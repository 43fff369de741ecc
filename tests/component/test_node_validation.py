"""Join validation and in-service canaries over real gRPC, with scripted nodes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.session import AGENT_VERSION, AgentSession, SessionSettings
from core import channels
from core.convert.generation import spec_to_pb
from core.grpc_errors import describe_rpc_error, error_info
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.metadata import bearer_metadata
from server.cli import _parser
from server.network.cli import run_command
from server.network.service import ValidationSettings
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime, canary_answers
from tests.harness import NetworkServer, eventually, open_raw_session, start_network

SPEC = GenerationSpec(
    model=MODEL_ID,
    messages=(ChatMessage(ChatRole.USER, "hello there"),),
    sampling=Sampling(max_tokens=5),
    max_prompt_tokens=100,
)
WRONG = {prompt: "I would rather not say" for prompt in canary_answers()}


class Nodes:
    """Scripted agents on one network server, stopped at the end of the test."""

    def __init__(self, network: NetworkServer) -> None:
        self._network = network
        self._tasks: list[asyncio.Task[None]] = []

    async def start(
        self, name: str, runtime: ScriptedRuntime, identity: NodeIdentity | None = None
    ) -> str:
        settings = SessionSettings(self._network.target, name)
        session = AgentSession(replace(settings, identity=identity or settings.identity), runtime)
        self._tasks.append(asyncio.create_task(session.run_forever()))
        await session.connected.wait()
        assert session.node_id is not None
        return session.node_id

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def _network(dsn: str, canary_rate: float) -> AsyncIterator[tuple[NetworkServer, Nodes]]:
    network = await start_network(dsn, validation=ValidationSettings(canary_rate=canary_rate))
    nodes = Nodes(network)
    try:
        yield network, nodes
    finally:
        await nodes.stop()
        await network.stop()


async def _node(network: NetworkServer, node_id: str) -> admin_pb.Node:
    async with channels.insecure_channel(network.target) as channel:
        response = await admin_grpc.NodeAdminServiceStub(channel).GetNode(
            admin_pb.GetNodeRequest(node_id=node_id), metadata=network.service
        )
    return response.node


async def _validated(network: NetworkServer, node_id: str) -> admin_pb.Node:
    service = network.component.service
    await eventually(lambda: not service.node(node_id).validating)
    return await _node(network, node_id)


async def _nodes_command(
    network: NetworkServer, capsys: pytest.CaptureFixture[str], *argv: str
) -> str:
    """`resultity nodes ...` against the network server; what it printed."""
    await run_command(_parser().parse_args(["nodes", "--network", network.target, *argv]))
    return capsys.readouterr().out


async def _run_job(network: NetworkServer) -> str:
    """Runs one ordinary job; returns the node it was assigned to."""
    async with channels.insecure_channel(network.target) as channel:
        call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
            dispatch_pb.RunJobRequest(job_id=uuid.uuid4().hex, spec=spec_to_pb(SPEC)),
            metadata=network.service,
        )
        events = [event async for event in call]
    assert events[-1].WhichOneof("event") == "finished"
    return events[0].assigned.node_id


async def test_node_answering_its_join_canary_serves_and_one_answering_wrongly_does_not(
    postgres_dsn: str,
) -> None:
    async with _network(postgres_dsn, canary_rate=0.0) as (network, nodes):
        good_runtime = ScriptedRuntime(answers=canary_answers(), token_delay_s=0.001)
        bad_runtime = ScriptedRuntime(answers=WRONG, token_delay_s=0.001)
        good = await nodes.start("good", good_runtime)
        bad = await nodes.start("bad", bad_runtime)

        good_node = await _validated(network, good)
        bad_node = await _validated(network, bad)

        [good_status] = good_node.model_status
        assert good_status.model == MODEL_ID
        assert good_status.validation == admin_pb.MODEL_VALIDATION_PASSED
        assert good_status.time_to_first_token_ms > 0
        assert good_status.tokens_per_second > 0
        assert good_node.state == admin_pb.NODE_STATE_READY
        assert good_node.reputation == 1.0

        [bad_status] = bad_node.model_status
        assert bad_status.validation == admin_pb.MODEL_VALIDATION_FAILED
        # Benchmarked before its canary failed: the figures are still shown.
        assert bad_status.tokens_per_second > 0
        assert bad_node.state == admin_pb.NODE_STATE_QUARANTINED
        assert bad_node.quarantine_reason
        # A wrong canary answer is on the session's record (verified_only rules).
        service = network.component.service
        assert (
            service.node(good).standing.failed_canary,
            service.node(bad).standing.failed_canary,
        ) == (False, True)

        bad_jobs = len(bad_runtime.started_jobs)
        assigned = [await _run_job(network) for _ in range(4)]
        assert assigned == [good] * 4
        assert len(bad_runtime.started_jobs) == bad_jobs
        [model] = network.component.service.models()
        assert model.ready_nodes == 1


async def test_node_failing_disguised_canaries_is_quarantined_and_its_neighbour_serves(
    postgres_dsn: str,
) -> None:
    async with _network(postgres_dsn, canary_rate=1.0) as (network, nodes):
        flaky_runtime = ScriptedRuntime(answers=canary_answers())
        flaky = await nodes.start("flaky", flaky_runtime)
        assert (await _validated(network, flaky)).state == admin_pb.NODE_STATE_READY

        # From now on the node answers canaries wrongly, ordinary jobs rightly. It is
        # alone, so the router cannot steer jobs (and their canaries) away from it.
        flaky_runtime.answers = dict(WRONG)
        service = network.component.service
        for _ in range(50):
            if service.node(flaky).standing.quarantine_reason:
                break
            try:
                await _run_job(network)
            except grpc.aio.AioRpcError as error:
                # The verdict of the last canary may land between two jobs.
                assert error.code() == grpc.StatusCode.UNAVAILABLE  # noqa: PT017
                assert service.node(flaky).standing.quarantine_reason
        await eventually(lambda: bool(service.node(flaky).standing.quarantine_reason))
        flaky_node = await _node(network, flaky)
        assert service.node(flaky).standing.failed_canary
        assert flaky_node.state == admin_pb.NODE_STATE_QUARANTINED
        assert flaky_node.reputation < ValidationSettings().quarantine_below

        healthy = await nodes.start("healthy", ScriptedRuntime(answers=canary_answers()))
        healthy_node = await _validated(network, healthy)
        assert healthy_node.state == admin_pb.NODE_STATE_READY
        assert healthy_node.reputation == 1.0

        await eventually(lambda: not service.node(flaky).active_jobs)
        flaky_jobs = len(flaky_runtime.started_jobs)
        assigned = [await _run_job(network) for _ in range(4)]
        assert assigned == [healthy] * 4
        assert len(flaky_runtime.started_jobs) == flaky_jobs


async def test_nodes_cli_lists_shows_drains_and_quarantines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, postgres_dsn: str
) -> None:
    async with _network(postgres_dsn, canary_rate=0.0) as (network, nodes):
        monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", network.service_token)
        node_id = await nodes.start("cli-node", ScriptedRuntime(answers=canary_answers()))
        await _validated(network, node_id)

        async def nodes_command(*argv: str) -> str:
            return await _nodes_command(network, capsys, *argv)

        # Logs go to stdout too: the table starts at its header.
        lines = (await nodes_command("list")).splitlines()
        table = lines[[line.startswith("NODE ") for line in lines].index(True) :]
        assert table[0].split() == [
            "NODE",
            "NAME",
            "REGION",
            "STATE",
            "JOBS",
            "REPUTATION",
            "MODELS",
            "SEEN",
        ]
        assert table[1].split()[:6] == [node_id, "cli-node", "-", "ready", "0/1", "1.00"]
        assert f"{MODEL_ID}(passed)" in table[1]

        details = await nodes_command("get", node_id)
        assert f"node:          {node_id}" in details
        assert f"{MODEL_ID}: passed, TTFT" in details

        assert "state:         draining" in await nodes_command("drain", node_id)
        quarantined = await nodes_command("quarantine", node_id, "--reason", "checking")
        assert "state:         quarantined" in quarantined
        assert "quarantined:   checking" in quarantined


async def test_a_quarantine_outlives_reconnects_until_the_node_is_released(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, postgres_dsn: str
) -> None:
    async with _network(postgres_dsn, canary_rate=0.0) as (network, nodes):
        monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", network.service_token)
        service = network.component.service
        identity = NodeIdentity.generate()
        node_id = await nodes.start("kept", ScriptedRuntime(answers=canary_answers()), identity)
        await _validated(network, node_id)
        await _nodes_command(network, capsys, "quarantine", node_id, "--reason", "checking")
        await nodes.stop()
        await eventually(lambda: all(node.node_id != node_id for node in service.nodes()))

        # The same key comes back: refused at hello, with the reason, and not registered.
        hello = agent_pb.Hello(
            node_name="kept",
            agent_version=AGENT_VERSION,
            models=[agent_pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
            max_concurrent_jobs=1,
        )
        _, responses, refused = await open_raw_session(
            network.target, lambda challenge: [signed_hello(identity, hello, challenge, "")]
        )
        assert responses == []
        assert refused is not None
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(refused)
        assert info is not None
        assert info.reason == "NODE_QUARANTINED"
        assert "checking" in (refused.details() or "")
        assert all(node.node_id != node_id for node in service.nodes())

        released = await _nodes_command(network, capsys, "release", node_id)
        assert f"{node_id} released" in released
        assert await nodes.start("kept", ScriptedRuntime(answers=canary_answers()), identity) == (
            node_id
        )
        node = await _validated(network, node_id)
        assert (node.state, node.reputation, node.quarantine_reason) == (
            admin_pb.NODE_STATE_READY,
            1.0,
            "",
        )
        assert await _run_job(network) == node_id
        # Releasing a node in service changes nothing; a node never seen is not found.
        assert "state:         ready" in await _nodes_command(network, capsys, "release", node_id)
        async with channels.insecure_channel(network.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await admin_grpc.NodeAdminServiceStub(channel).ReleaseNode(
                    admin_pb.ReleaseNodeRequest(node_id="nobody"),
                    metadata=bearer_metadata(network.service_token),
                )
        assert describe_rpc_error(unknown.value) == (
            "NOT_FOUND: node nobody never joined this network [NOT_FOUND]"
        )


async def test_a_quarantined_node_in_service_is_released_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, postgres_dsn: str
) -> None:
    async with _network(postgres_dsn, canary_rate=0.0) as (network, nodes):
        monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", network.service_token)
        node_id = await nodes.start("stays", ScriptedRuntime(answers=canary_answers()))
        await _validated(network, node_id)
        await _nodes_command(network, capsys, "quarantine", node_id)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _run_job(network)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "state:         ready" in await _nodes_command(network, capsys, "release", node_id)
        assert await _run_job(network) == node_id
