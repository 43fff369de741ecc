"""The runtime in a supervised worker process: a crash or a hang costs the job that
caused it, the worker comes back, and the agent's session never notices."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.backoff import Backoff
from agent.runtime.base import (
    Finished,
    GenerationError,
    GenerationEvent,
    GenerationRequest,
    InvalidRequest,
    PromptTooLong,
    Started,
    TokenText,
)
from agent.runtime.worker import WorkerRuntime
from agent.runtime.worker_protocol import Failed
from agent.session import AgentSession, SessionSettings
from core import channels
from core.convert.generation import spec_to_pb
from core.grpc_errors import error_info
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.prompt_prefixes import prefix_fingerprints
from tests.doubles.crashing_runtime import ABORT, HANG, SEGFAULT, crashing_runtime
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, MODEL_ID
from tests.harness import eventually, start_network

FAST_RESTART = Backoff(base_s=0.05, cap_s=0.2)


def _request(prompt: str = "hello there", max_tokens: int = 100) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, prompt),),
        sampling=Sampling(max_tokens=max_tokens),
        max_prompt_tokens=100,
    )


async def _events(runtime: WorkerRuntime, request: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in runtime.generate(request)]


def _text(events: list[GenerationEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TokenText))


@pytest.fixture
async def worker() -> AsyncIterator[WorkerRuntime]:
    runtime = await WorkerRuntime.start(crashing_runtime, backoff=FAST_RESTART, cancel_grace_s=0.5)
    yield runtime
    await runtime.close()


async def test_tokens_stream_through_the_worker_as_the_runtime_yields_them(
    worker: WorkerRuntime,
) -> None:
    events = await _events(worker, _request())

    assert isinstance(events[0], Started)
    assert _text(events) == DEFAULT_SCRIPT
    assert isinstance(events[-1], Finished)
    assert events[-1].completion_tokens == 10
    assert [model.model for model in worker.models] == [MODEL_ID]


async def test_the_conversations_the_runtime_caches_reach_the_agent() -> None:
    cached = prefix_fingerprints(MODEL_ID, None, (ChatMessage(ChatRole.USER, "hello there"),))
    worker = await WorkerRuntime.start(functools.partial(crashing_runtime, cached=cached))
    try:
        assert worker.cached_prefixes() == ()  # reported once a generation changed them
        await _events(worker, _request())
        # Known by the time the generation has finished: the next turn may follow at once.
        assert worker.cached_prefixes() == cached
    finally:
        await worker.close()


async def test_runtime_errors_keep_their_kind_across_the_process_boundary(
    worker: WorkerRuntime,
) -> None:
    with pytest.raises(PromptTooLong):
        await _events(worker, _request("a b c " * 100))
    assert worker.starts == 1


@pytest.mark.parametrize("crash", [ABORT, SEGFAULT])
async def test_a_crash_fails_its_generation_and_the_worker_comes_back(
    worker: WorkerRuntime, crash: str
) -> None:
    first = worker.pid

    with pytest.raises(GenerationError):
        await _events(worker, _request(crash))

    assert _text(await _events(worker, _request())) == DEFAULT_SCRIPT
    assert worker.starts == 2
    assert worker.pid not in (None, first)


async def test_a_generation_running_beside_a_crash_fails_too_but_nothing_else(
    worker: WorkerRuntime,
) -> None:
    slow = await WorkerRuntime.start(
        functools.partial(crashing_runtime, token_delay_s=0.05), backoff=FAST_RESTART
    )
    try:
        running = slow.generate(_request())
        assert isinstance(await anext(running), Started)
        with pytest.raises(GenerationError):
            await _events(slow, _request(ABORT))
        with pytest.raises(GenerationError):
            _ = [event async for event in running]
        assert _text(await _events(slow, _request(max_tokens=2))) == "one two"
    finally:
        await slow.close()


async def test_a_hung_generation_is_killed_once_cancelled_and_the_worker_restarts(
    worker: WorkerRuntime,
) -> None:
    hung = worker.generate(_request(HANG))
    assert isinstance(await anext(hung), Started)

    await hung.aclose()  # what cancelling the job does

    await eventually(lambda: worker.starts == 2)
    assert _text(await _events(worker, _request())) == DEFAULT_SCRIPT


def test_schema_errors_are_the_callers_not_the_nodes() -> None:
    """An InvalidRequest raised in the worker arrives as one, with its param."""
    rebuilt = Failed.of(7, InvalidRequest("bad schema", "response_format")).error()
    assert isinstance(rebuilt, InvalidRequest)
    assert rebuilt.param == "response_format"


async def test_an_agent_keeps_its_session_while_its_runtime_crashes_and_restarts(
    postgres_dsn: str,
) -> None:
    network = await start_network(postgres_dsn)
    runtime = await WorkerRuntime.start(crashing_runtime, backoff=FAST_RESTART)
    session = AgentSession(SessionSettings(network.target, "node"), runtime)
    agent = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        node_id = session.node_id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _run_job(network.target, network.service, "crash", ABORT)
        text = await _run_job(network.target, network.service, "after", "hello there")
        assert session.node_id == node_id
        assert [node.node_id for node in network.component.service.nodes()] == [node_id]
    finally:
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent
        await runtime.close()
        await network.stop()

    assert raised.value.code() == grpc.StatusCode.ABORTED
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == "JOB_FAILED"
    assert text == DEFAULT_SCRIPT
    assert runtime.starts == 2


async def _run_job(
    target: str, metadata: tuple[tuple[str, str], ...], job_id: str, prompt: str
) -> str:
    spec = GenerationSpec(
        model=MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, prompt),),
        sampling=Sampling(max_tokens=100),
        max_prompt_tokens=100,
    )
    async with channels.insecure_channel(target) as channel:
        call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
            dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec)), metadata=metadata
        )
        events = [event async for event in call]
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
