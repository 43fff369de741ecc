"""The agent's heartbeats carry the runtime's cached conversations, early when they change."""

from __future__ import annotations

import asyncio

import pytest
from resultity.agent.v1 import agent_service_pb2 as pb

from agent import heartbeats
from agent.heartbeats import Heartbeats
from agent.runner import JobRef, JobRunner
from agent.runtime.base import GenerationRequest
from core.agent_messages import ChunkReport, FailureKind, Heartbeat
from core.convert.agent_reports import report_from_pb
from core.inference import ChatMessage, ChatRole, FinishReason, Sampling
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import eventually

# Regular beats never come during a test: only early ones do.
HOUR_S = 3600.0


class _Ignored:
    def chunk(self, chunk: ChunkReport) -> None:
        pass

    def done(
        self,
        job: JobRef,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
    ) -> None:
        pass

    def started(self, job: JobRef) -> None:
        pass

    def waiting(self, job: JobRef) -> None:
        pass

    def failed(self, job: JobRef, kind: FailureKind, message: str, param: str = "") -> None:
        pass


def _request() -> GenerationRequest:
    return GenerationRequest(
        MODEL_ID, (ChatMessage(ChatRole.USER, "hi"),), Sampling(max_tokens=2), 100
    )


async def _run_job(runner: JobRunner, job_id: str) -> None:
    runner.start(JobRef(job_id, 1), _request())
    await runner.wait_idle()
    # The watcher saw the job's end.
    await eventually(lambda: not runner.job_ended.is_set())


def _beat(message: pb.ConnectRequest | None) -> Heartbeat:
    assert message is not None
    beat = report_from_pb(message)
    assert isinstance(beat, Heartbeat)
    return beat


@pytest.fixture(autouse=True)
def _no_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeats, "EARLY_BEAT_GAP_S", 0.0)


async def test_a_beat_goes_when_a_job_leaves_a_new_conversation_cached() -> None:
    runtime = ScriptedRuntime()
    runner = JobRunner(runtime, _Ignored())
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
    beats = Heartbeats(outbound, runner, HOUR_S)
    beats.start()
    try:
        runtime.cached = (11, 7)
        await _run_job(runner, "first")
        assert _beat(await outbound.get()).cached_prefixes == (11, 7)

        # Same conversations held: no beat before the interval.
        await _run_job(runner, "second")
        assert outbound.empty()

        runtime.cached = (12, 11, 7)
        await _run_job(runner, "third")
        assert _beat(await outbound.get()).cached_prefixes == (12, 11, 7)
    finally:
        beats.stop()


async def test_a_beat_advertises_at_most_the_newest_bound() -> None:
    runtime = ScriptedRuntime(cached=tuple(range(MAX_ADVERTISED_PREFIXES * 2)))
    runner = JobRunner(runtime, _Ignored())
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
    beats = Heartbeats(outbound, runner, HOUR_S)
    beats.start()
    try:
        await _run_job(runner, "job")
        beat = _beat(await outbound.get())
        assert beat.cached_prefixes == tuple(range(MAX_ADVERTISED_PREFIXES))
    finally:
        beats.stop()


async def test_an_early_beat_waits_for_the_previous_early_one_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The beats start as if one had just gone (as a regular beat would have, just
    before the job ended): the first change still goes at once, since a tool loop's
    next turn comes within milliseconds; the next change waits for the gap."""
    monkeypatch.setattr(heartbeats, "EARLY_BEAT_GAP_S", HOUR_S)
    runtime = ScriptedRuntime()
    runner = JobRunner(runtime, _Ignored())
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
    beats = Heartbeats(outbound, runner, HOUR_S)
    beats.start()
    try:
        runtime.cached = (11, 7)
        await _run_job(runner, "first")
        assert _beat(await outbound.get()).cached_prefixes == (11, 7)

        runtime.cached = (12, 11, 7)
        await _run_job(runner, "second")
        assert outbound.empty()
    finally:
        beats.stop()
