"""A conversation's next turn goes to the node that advertises its prefix as cached,
unless that node has no free slot (agents over real gRPC, the network's router)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.runtime.base import GenerationEvent, GenerationRequest, TokenText
from agent.session import AgentSession, SessionSettings
from core import channels
from core.convert.generation import spec_to_pb
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.prometheus import PrometheusMetrics
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES, prefix_fingerprints
from server.network.nodes import NodeSession
from server.network.service import LivenessSettings
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, MODEL_ID, ScriptedRuntime
from tests.harness import NetworkServer, eventually, start_network

LONG_SCRIPT = " ".join(f"w{i}" for i in range(100))
QUESTION = ChatMessage(ChatRole.USER, "plan a trip")
TURN_ONE = (QUESTION, ChatMessage(ChatRole.ASSISTANT, DEFAULT_SCRIPT))
FOLLOW_UP = (*TURN_ONE, ChatMessage(ChatRole.USER, "to Lisbon"))


@dataclass
class CachingRuntime(ScriptedRuntime):
    """Holds every chat it answered, with its answer, as a node reusing prompt
    prefixes does: newest first, at most MAX_ADVERTISED_PREFIXES."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        answer = []
        async for event in super().generate(request):
            if isinstance(event, TokenText):
                answer.append(event.text)
            yield event
        held = (*request.messages, ChatMessage(ChatRole.ASSISTANT, "".join(answer)))
        latest = prefix_fingerprints(request.model, request.tool_use, held)[-1]
        self.cached = (latest, *self.cached)[:MAX_ADVERTISED_PREFIXES]


def _spec(messages: tuple[ChatMessage, ...], max_tokens: int = 10) -> GenerationSpec:
    return GenerationSpec(MODEL_ID, messages, Sampling(max_tokens=max_tokens), 500)


async def _assigned_node(network: NetworkServer, job_id: str, spec: GenerationSpec) -> str:
    """Runs the job to its end; returns the node it was assigned to."""
    async with channels.insecure_channel(network.target) as channel:
        call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
            dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec)),
            metadata=network.service,
        )
        events = [event async for event in call]
    [assigned] = [e.assigned for e in events if e.WhichOneof("event") == "assigned"]
    return assigned.node_id


@contextlib.asynccontextmanager
async def _agents(
    network: NetworkServer, runtimes: dict[str, ScriptedRuntime]
) -> AsyncIterator[dict[str, AgentSession]]:
    sessions = {
        name: AgentSession(SessionSettings(network.target, name), runtime)
        for name, runtime in runtimes.items()
    }
    tasks = [asyncio.create_task(session.run_forever()) for session in sessions.values()]
    try:
        for session in sessions.values():
            await session.connected.wait()
        yield sessions
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _session(network: NetworkServer, agent: AgentSession) -> NodeSession:
    assert agent.node_id is not None
    return network.component.service.node(agent.node_id)


@pytest.fixture
def metrics() -> PrometheusMetrics:
    return PrometheusMetrics()


@pytest.fixture
async def network(postgres_dsn: str, metrics: PrometheusMetrics) -> AsyncIterator[NetworkServer]:
    server = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0),
        metrics=metrics,
    )
    yield server
    await server.stop()


def _affinity(metrics: PrometheusMetrics) -> dict[str, float]:
    """resultity_routing_affinity_total by outcome (the one model)."""
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
        if sample.name == "resultity_routing_affinity_total"
    }


# Either node may come first in the router's tie order: the other holds the prefix.
@pytest.mark.parametrize("holder", ["a", "b"])
async def test_the_next_turn_goes_to_the_equally_free_node_holding_its_prefix(
    network: NetworkServer, metrics: PrometheusMetrics, holder: str
) -> None:
    runtimes = {name: ScriptedRuntime() for name in "ab"}
    runtimes[holder].cached = prefix_fingerprints(MODEL_ID, None, TURN_ONE)[-1:]
    async with _agents(network, runtimes) as agents:
        held = _session(network, agents[holder])
        await eventually(lambda: bool(held.cached_prefixes))
        # Round-robin alone would send the second and third elsewhere.
        picks = [
            await _assigned_node(network, f"turn-{index}", _spec(FOLLOW_UP)) for index in range(3)
        ]

    assert picks == [held.node_id] * 3
    assert len(runtimes[holder].started_jobs) == 3
    assert _affinity(metrics) == {"hit": 3}


async def test_a_saturated_holder_leaves_the_next_turn_to_a_free_node(
    network: NetworkServer, metrics: PrometheusMetrics
) -> None:
    # One slot each; the holder is kept busy by a long answer to the same turn.
    holder = ScriptedRuntime(
        script=LONG_SCRIPT,
        token_delay_s=0.01,
        cached=prefix_fingerprints(MODEL_ID, None, TURN_ONE)[-1:],
    )
    free = ScriptedRuntime()
    async with _agents(network, {"holder": holder, "free": free}) as agents:
        held = _session(network, agents["holder"])
        await eventually(lambda: bool(held.cached_prefixes))
        long = asyncio.create_task(_assigned_node(network, "long", _spec(FOLLOW_UP, 100)))
        await eventually(lambda: len(held.active_jobs) == 1)
        retried = await _assigned_node(network, "retried", _spec(FOLLOW_UP))
        first = await long

    assert first == held.node_id
    assert retried == agents["free"].node_id
    assert [len(holder.started_jobs), len(free.started_jobs)] == [1, 1]
    # The second turn passed the holder over: it had no free slot.
    assert _affinity(metrics) == {"hit": 1, "passed_over": 1}


async def test_a_node_advertises_a_conversation_as_soon_as_it_answered_it(
    postgres_dsn: str,
) -> None:
    """The heartbeat after the answer goes early: a regular one is minutes away."""
    network = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(heartbeat_interval_s=300.0, heartbeat_timeout_s=600.0),
    )
    runtimes: dict[str, ScriptedRuntime] = {name: CachingRuntime() for name in "ab"}
    try:
        async with _agents(network, runtimes) as agents:
            first = await _assigned_node(network, "turn-1", _spec((QUESTION,)))
            [answered] = [name for name, agent in agents.items() if agent.node_id == first]
            held = _session(network, agents[answered])
            fingerprint = prefix_fingerprints(MODEL_ID, None, TURN_ONE)[-1]
            await eventually(lambda: fingerprint in held.cached_prefixes)
            second = await _assigned_node(network, "turn-2", _spec(FOLLOW_UP))
    finally:
        await network.stop()

    assert second == first
