"""A job outlives its node: continuation elsewhere, fencing of the old epoch, exact billing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.identity import NodeIdentity, signed_hello
from agent.runtime.base import GenerationEvent, GenerationRequest, TokenText, Waiting
from agent.session import AGENT_VERSION, AgentSession, SessionSettings
from core import channels
from core.convert.generation import spec_to_pb
from core.grpc_errors import error_info
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling, ToolCall
from core.tool_calls import render_calls
from server.network.catalog import SMOLLM2_135M
from server.network.service import FailoverSettings, LivenessSettings
from tests.doubles.scripted_runtime import (
    DEFAULT_SCRIPT,
    MODEL_ID,
    ScriptedRuntime,
    scripted_tokens,
)
from tests.harness import NetworkServer, eventually, running_platform, start_network

PRICE = SMOLLM2_135M.price
LONG_SCRIPT = " ".join(f"w{i}" for i in range(150))


def _charge(prompt: int, completion: int) -> int:
    return prompt * PRICE.prompt + completion * PRICE.completion


@pytest.mark.parametrize("kill_after", [1, 10, 100])
async def test_node_killed_mid_stream_is_continued_on_another_and_billed_once(
    postgres_dsn: str, kill_after: int
) -> None:
    async with running_platform(postgres_dsn) as platform:
        for name in ("a", "b", "c"):
            runtime = ScriptedRuntime(script=LONG_SCRIPT, token_delay_s=0.005)
            await platform.start_agent(runtime, name=name)
        customer = await platform.customer(credits=1_000_000)
        params = pb.ChatCompletionParams(
            model=SMOLLM2_135M.id,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
        )

        parts: list[str] = []
        roles = 0
        usage = None
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=params), metadata=customer.metadata
        ):
            if message.HasField("usage"):
                usage = message.usage
            if not message.choices:
                continue
            choice = message.choices[0]
            roles += choice.role == common_pb.CHAT_ROLE_ASSISTANT
            if choice.content:
                parts.append(choice.content)
                if len(parts) == kill_after:
                    await platform.agent_running().stop()

        assert "".join(parts) == LONG_SCRIPT
        assert roles == 1
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (4, 150)
        balance = await platform.balance(customer)
        assert balance.held_micro_credits == 0
        assert 1_000_000 - balance.available_micro_credits == _charge(4, 150)


async def test_a_tool_call_cut_by_a_lost_node_is_finished_by_another(
    postgres_dsn: str,
) -> None:
    arguments = json.dumps({"note": LONG_SCRIPT[:200]})
    block = render_calls([ToolCall("", "write_note", arguments)])
    runtimes = [
        ScriptedRuntime(tool_answers={"hello there": block}, token_delay_s=0.005) for _ in "ab"
    ]
    async with running_platform(postgres_dsn) as platform:
        for name, runtime in zip("ab", runtimes, strict=True):
            await platform.start_agent(runtime, name=name)
        customer = await platform.customer(credits=1_000_000)
        params = pb.ChatCompletionParams(
            model=SMOLLM2_135M.id,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
            tools=[common_pb.FunctionTool(name="write_note")],
            tool_choice=common_pb.ToolChoice(mode=common_pb.TOOL_CHOICE_MODE_REQUIRED),
        )

        pieces: list[pb.ToolCallDelta] = []
        reasons = []
        usage = None
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=params), metadata=customer.metadata
        ):
            if message.HasField("usage"):
                usage = message.usage
            for choice in message.choices:
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
                pieces.extend(choice.tool_calls)
                if len(pieces) == 3 and choice.tool_calls:
                    await platform.agent_running().stop()

        # The second node continued the first's call under the same tools.
        [first], [second] = (runtime.started_jobs for runtime in runtimes)
        assert sorted(job.continuation is not None for job in (first, second)) == [False, True]
        assert first.tool_use is not None
        assert second.tool_use == first.tool_use
        # One call, announced once, its arguments whole across the two nodes.
        assert [(piece.index, piece.name) for piece in pieces if piece.id] == [(0, "write_note")]
        assert "".join(piece.arguments for piece in pieces) == arguments
        assert reasons == [common_pb.FINISH_REASON_TOOL_CALLS]
        assert usage is not None
        assert usage.completion_tokens == len(scripted_tokens(block))
        balance = await platform.balance(customer)
        assert 1_000_000 - balance.available_micro_credits == _charge(
            usage.prompt_tokens, usage.completion_tokens
        )


def _spec(max_tokens: int = 100) -> GenerationSpec:
    return GenerationSpec(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "hello there"),),
        sampling=Sampling(max_tokens=max_tokens),
        max_prompt_tokens=100,
    )


class RawNode:
    """A hand-driven agent: it says what the test tells it to, when it is told.

    It reports each assigned job as started at once (running, not queued),
    unless ``starts_jobs`` is off: then they wait in its queue for ever.
    """

    def __init__(self, target: str, *, starts_jobs: bool = True) -> None:
        self._starts_jobs = starts_jobs
        self._channel = channels.insecure_channel(target)
        self._outbound: asyncio.Queue[agent_pb.ConnectRequest | None] = asyncio.Queue()
        self.responses: asyncio.Queue[agent_pb.ConnectResponse] = asyncio.Queue()
        self.node_id = ""
        self.identity = NodeIdentity.generate()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        call = agent_grpc.AgentServiceStub(self._channel).Connect(self._drain())
        self._tasks.append(asyncio.create_task(self._read(call)))
        challenge = (await self.responses.get()).challenge
        hello = agent_pb.Hello(
            node_name="raw",
            agent_version=AGENT_VERSION,
            models=[agent_pb.ServedModel(model=MODEL_ID, runtime="raw", context_length=2048)],
            max_concurrent_jobs=1,
        )
        self.send(signed_hello(self.identity, hello, challenge, ""))
        self.node_id = (await self.responses.get()).welcome.node_id
        await self.next("config")  # sent right after the welcome
        self._tasks.append(asyncio.create_task(self._beat()))

    def send(self, request: agent_pb.ConnectRequest) -> None:
        self._outbound.put_nowait(request)

    def chunk(self, job_id: str, epoch: int, first: int, words: list[str], prompt: int = 0) -> None:
        self.send(
            agent_pb.ConnectRequest(
                job_chunk=agent_pb.JobChunk(
                    job_id=job_id,
                    epoch=epoch,
                    text="".join(words),
                    token_count=len(words),
                    prompt_tokens=prompt,
                    token_ids=list(range(first, first + len(words))),
                )
            )
        )

    async def next(self, kind: str) -> agent_pb.ConnectResponse:
        while True:
            response = await self.responses.get()
            if response.WhichOneof("message") == kind:
                return response

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        await self._channel.close(grace=None)

    async def _drain(self) -> AsyncIterator[agent_pb.ConnectRequest]:
        while (request := await self._outbound.get()) is not None:
            yield request

    async def _read(self, call: AsyncIterator[agent_pb.ConnectResponse]) -> None:
        async for response in call:
            if self._starts_jobs and response.WhichOneof("message") == "assign_job":
                assign = response.assign_job
                self.send(
                    agent_pb.ConnectRequest(
                        job_started=agent_pb.JobStarted(job_id=assign.job_id, epoch=assign.epoch)
                    )
                )
            self.responses.put_nowait(response)

    async def _beat(self) -> None:
        # Alive and heartbeating throughout: only its output for the job is late.
        while True:
            self.send(agent_pb.ConnectRequest(heartbeat=agent_pb.Heartbeat()))
            await asyncio.sleep(0.05)


async def _run_job(
    network: NetworkServer, job_id: str, spec: GenerationSpec
) -> list[dispatch_pb.RunJobResponse]:
    async with channels.insecure_channel(network.target) as channel:
        call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
            dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec)),
            metadata=network.service,
        )
        return [event async for event in call]


def _text(events: list[dispatch_pb.RunJobResponse]) -> str:
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")


@pytest.fixture
async def network(postgres_dsn: str) -> AsyncIterator[NetworkServer]:
    server = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0),
        failover=FailoverSettings(stall_timeout_s=0.3),
    )
    yield server
    await server.stop()


async def test_partitioned_nodes_late_output_is_dropped_and_earns_nothing(
    network: NetworkServer,
) -> None:
    words = scripted_tokens(DEFAULT_SCRIPT)
    partitioned = RawNode(network.target)
    await partitioned.start()
    job = asyncio.create_task(_run_job(network, "job-1", _spec()))
    assign = (await partitioned.next("assign_job")).assign_job
    assert (assign.epoch, assign.HasField("continuation")) == (1, False)

    # A second node joins; the first delivers three tokens, then goes quiet.
    runtime = ScriptedRuntime(token_delay_s=0.05)
    session = AgentSession(SessionSettings(network.target, "healthy"), runtime)
    healthy = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        partitioned.chunk("job-1", 1, 0, words[:3], prompt=4)

        # Given up for the job after the stall timeout; the cancel arrives late.
        cancel = (await partitioned.next("cancel_job")).cancel_job
        assert (cancel.job_id, cancel.epoch) == ("job-1", 1)
        partitioned.chunk("job-1", 1, 3, [" LATE", " AND", " WRONG"])
        partitioned.send(
            agent_pb.ConnectRequest(
                job_done=agent_pb.JobDone(
                    job_id="job-1",
                    epoch=1,
                    finish_reason=common_pb.FINISH_REASON_STOP,
                    usage=common_pb.Usage(prompt_tokens=4, completion_tokens=6),
                )
            )
        )
        events = await job
    finally:
        healthy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await healthy
        await partitioned.close()

    assert _text(events) == DEFAULT_SCRIPT
    [migrated] = [e.migrated for e in events if e.WhichOneof("event") == "migrated"]
    assert (migrated.node_id, migrated.epoch) == (session.node_id, 2)
    continued = runtime.started_jobs[0].continuation
    assert continued is not None
    assert (continued.text, continued.token_count, continued.token_ids) == (
        "one two three",
        3,
        (0, 1, 2),
    )
    finished = events[-1].finished
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (4, 10)
    shares = [
        (s.node_id, s.usage.prompt_tokens, s.usage.completion_tokens) for s in finished.node_usage
    ]
    assert shares == [(partitioned.node_id, 4, 3), (session.node_id, 0, 7)]


async def test_job_fails_once_it_has_moved_max_migrations_times(postgres_dsn: str) -> None:
    server = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0),
        failover=FailoverSettings(max_migrations=1, stall_timeout_s=0.2),
    )
    nodes = [RawNode(server.target) for _ in range(3)]
    try:
        for node in nodes:
            await node.start()
        job = asyncio.create_task(_run_job(server, "job-2", _spec()))
        # Nobody delivers anything: the job moves once, then fails.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await job
        assert raised.value.code() == grpc.StatusCode.ABORTED
        assigned = [node for node in nodes if not node.responses.empty()]
        assert len(assigned) == 2
    finally:
        for node in nodes:
            await node.close()
        await server.stop()


async def test_continuation_with_nothing_left_only_finishes(network: NetworkServer) -> None:
    """The lost node delivered the whole budget but not its done: the next one just ends."""
    words = scripted_tokens(DEFAULT_SCRIPT)
    partitioned = RawNode(network.target)
    await partitioned.start()
    job = asyncio.create_task(_run_job(network, "job-3", _spec(max_tokens=4)))
    await partitioned.next("assign_job")
    runtime = ScriptedRuntime()
    session = AgentSession(SessionSettings(network.target, "healthy"), runtime)
    healthy = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        partitioned.chunk("job-3", 1, 0, words[:4], prompt=4)
        await partitioned.close()
        events = await job
    finally:
        healthy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await healthy
    assert _text(events) == "".join(words[:4])
    assert runtime.started_jobs[0].sampling.max_tokens == 0
    finished = events[-1].finished
    assert finished.finish_reason == common_pb.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 4
    await eventually(lambda: len(network.component.service.nodes()) == 1)


@contextlib.asynccontextmanager
async def _one_node_stalling_after(
    postgres_dsn: str, stall_timeout_s: float, runtime: ScriptedRuntime, name: str
) -> AsyncIterator[NetworkServer]:
    """A network that gives up a job silent for ``stall_timeout_s``, with one connected
    agent running ``runtime``."""
    server = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0),
        failover=FailoverSettings(stall_timeout_s=stall_timeout_s),
    )
    session = AgentSession(SessionSettings(server.target, name), runtime)
    agent = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        yield server
    finally:
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent
        await server.stop()


async def test_a_job_queued_behind_a_slow_one_is_not_taken_for_a_stall(
    postgres_dsn: str,
) -> None:
    """Time in the node's queue is not silence: the stall timer starts with the job."""
    # One slot; each job takes about three stall timeouts (150 tokens, 0.02 s apart),
    # while a token is late only if the loop stalls for a whole second.
    runtime = ScriptedRuntime(script=LONG_SCRIPT, token_delay_s=0.02)
    async with _one_node_stalling_after(postgres_dsn, 1.0, runtime, "busy") as server:
        slow = asyncio.create_task(_run_job(server, "slow", _spec(max_tokens=150)))
        await eventually(lambda: len(runtime.started_jobs) == 1)
        innocent = await _run_job(server, "innocent", _spec(max_tokens=150))
        first = await slow

    for events in (first, innocent):
        assert _text(events) == LONG_SCRIPT
        assert not [e for e in events if e.WhichOneof("event") == "migrated"]


@dataclass
class PreemptedRuntime(ScriptedRuntime):
    """Pauses each generation after its second token for ``pause_s`` (preempted for
    cache cells), saying so every ``every_s`` (unset: every ``waiting_report_s`` of
    the request) as the llama.cpp scheduler does."""

    pause_s: float = 0.0
    every_s: float | None = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        every_s = request.waiting_report_s if self.every_s is None else self.every_s
        tokens = 0
        async for event in super().generate(request):
            yield event
            if isinstance(event, TokenText):
                tokens += 1
                paused = 0.0
                while tokens == 2 and paused < self.pause_s:
                    yield Waiting()
                    await asyncio.sleep(every_s)
                    paused += every_s


async def test_a_job_its_node_reports_waiting_is_not_taken_for_a_stall(
    postgres_dsn: str,
) -> None:
    """Silence while the node's scheduler holds the job back, reported, is not a stall."""
    # Silent for three stall timeouts, reported waiting ten times per stall timeout.
    runtime = PreemptedRuntime(pause_s=3.0, every_s=0.1)
    async with _one_node_stalling_after(postgres_dsn, 1.0, runtime, "preempting") as server:
        events = await _run_job(server, "preempted", _spec())

    assert _text(events) == DEFAULT_SCRIPT
    assert not [e for e in events if e.WhichOneof("event") == "migrated"]


async def test_a_stall_timeout_under_the_default_report_interval_quickens_the_reports(
    postgres_dsn: str,
) -> None:
    """The welcome tells the agent the network's stall timeout (1 s, far under the
    runtime's default 5 s between waiting reports): the agent asks its runtime to
    report a held-back job four times per stall timeout, so it is not given up."""
    runtime = PreemptedRuntime(pause_s=3.0)
    async with _one_node_stalling_after(postgres_dsn, 1.0, runtime, "told") as server:
        events = await _run_job(server, "held-back", _spec())

    assert [job.waiting_report_s for job in runtime.started_jobs] == [pytest.approx(1.0 / 4)]
    assert _text(events) == DEFAULT_SCRIPT
    assert not [e for e in events if e.WhichOneof("event") == "migrated"]


async def test_a_job_that_never_leaves_the_queue_fails_with_a_retry_hint(
    postgres_dsn: str,
) -> None:
    server = await start_network(
        postgres_dsn,
        liveness=LivenessSettings(heartbeat_interval_s=0.05, heartbeat_timeout_s=5.0),
        failover=FailoverSettings(stall_timeout_s=0.1, queue_timeout_s=0.5),
    )
    stuck = RawNode(server.target, starts_jobs=False)
    try:
        await stuck.start()
        job = asyncio.create_task(_run_job(server, "queued", _spec()))
        await stuck.next("assign_job")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await job
        cancel = (await stuck.next("cancel_job")).cancel_job
    finally:
        await stuck.close()
        await server.stop()

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == "NO_CAPACITY"
    assert info.metadata["retry_after_s"] == str(FailoverSettings().queue_retry_after_s)
    assert (cancel.job_id, cancel.epoch) == ("queued", 1)
