"""DispatchService.RunJobs on a network with a scripted node: many jobs on one
stream, each with its own events in order and its end; a cancel, or the stream's
end, cancels a job on its node as cancelling its RunJob call does; a job's error
is the status its RunJob call ends with; a duplicate start and a start beyond the
stream's limit are refused for that job alone; the caller is checked as RunJob's;
each job counts in the gRPC call metrics as its RunJob call would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core.convert.generation import spec_to_pb
from core.grpc_errors import Failure
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.job_records import JobOutcome
from core.metadata import bearer_metadata
from core.prometheus import PrometheusMetrics
from server.network import job_streams
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime, scripted_tokens
from tests.harness import Platform, eventually, running_platform, until

Call = grpc.aio.StreamStreamCall[dispatch_pb.RunJobsRequest, dispatch_pb.RunJobsResponse]
DISPATCH = "resultity.network.v1.DispatchService"


def _answer(n: int) -> str:
    return " ".join(f"job{n}-word{i}" for i in range(6))


ANSWERS = {f"question {n}": _answer(n) for n in range(12)}


def _start(job_id: str, prompt: str, *, model: str = MODEL_ID) -> dispatch_pb.RunJobsRequest:
    spec = GenerationSpec(
        model=model,
        messages=(ChatMessage(ChatRole.USER, prompt),),
        sampling=Sampling(max_tokens=50),
        max_prompt_tokens=100,
    )
    return dispatch_pb.RunJobsRequest(
        start=dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec))
    )


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as platform:
        yield platform


def _stream(platform: Platform) -> Call:
    return dispatch_grpc.DispatchServiceStub(platform.channel).RunJobs(metadata=platform.service)


Messages = dict[str, list[dispatch_pb.RunJobsResponse]]


async def _read_until(call: Call, done: Callable[[Messages], bool]) -> Messages:
    """Each job's messages, read until ``done`` holds of them."""
    messages: Messages = {}
    while not done(messages):
        message = await call.read()
        assert isinstance(message, dispatch_pb.RunJobsResponse)
        messages.setdefault(message.job_id, []).append(message)
    return messages


def _ends(messages: Messages, job_id: str) -> list[dispatch_pb.RunJobsResponse]:
    return [m for m in messages.get(job_id, []) if m.HasField("end")]


async def _until_ended(call: Call, job_ids: set[str]) -> Messages:
    """Each job's messages until every one of ``job_ids`` has ended."""
    return await _read_until(call, lambda got: all(_ends(got, job) for job in job_ids))


def _text(messages: list[dispatch_pb.RunJobsResponse]) -> str:
    return "".join(m.event.delta.text for m in messages if m.event.HasField("delta"))


async def test_jobs_on_one_stream_each_get_their_events_in_order_and_their_end(
    platform: Platform,
) -> None:
    await platform.start_agent(ScriptedRuntime(answers=ANSWERS, slot_count=12))
    call = _stream(platform)
    for n in range(12):
        await call.write(_start(f"job-{n}", f"question {n}"))
    messages = await _until_ended(call, {f"job-{n}" for n in range(12)})
    for n in range(12):
        got = messages[f"job-{n}"]
        kinds = [m.WhichOneof("response") for m in got]
        assert kinds == ["event"] * (len(got) - 1) + ["end"]
        assert got[0].event.HasField("assigned")
        assert got[-2].event.HasField("finished")
        assert got[-1].end.code == grpc.StatusCode.OK.value[0]
        assert _text(got) == _answer(n)
        assert got[-2].event.finished.usage.completion_tokens == len(scripted_tokens(_answer(n)))
    call.cancel()


async def test_a_cancel_ends_one_job_on_its_node_and_the_others_run_on(
    platform: Platform,
) -> None:
    runtime = ScriptedRuntime(answers=ANSWERS, slot_count=4, token_delay_s=0.02)
    await platform.start_agent(runtime)
    call = _stream(platform)
    for n in range(3):
        await call.write(_start(f"job-{n}", f"question {n}"))
    first = await call.read()
    assert isinstance(first, dispatch_pb.RunJobsResponse)
    await call.write(dispatch_pb.RunJobsRequest(cancel=first.job_id))
    others = {f"job-{n}" for n in range(3)} - {first.job_id}
    messages = await _until_ended(call, others)
    for job_id in others:
        assert _text(messages[job_id]) == _answer(int(job_id[-1]))
    await eventually(lambda: runtime.cancelled_jobs == 1)
    await until(
        lambda: platform.network.service.job_records([first.job_id]),
        lambda found: [record.outcome for record in found] == [JobOutcome.CANCELLED],
    )
    # Whatever the cancelled job still had in flight never ends it.
    assert all(not m.HasField("end") for m in messages.get(first.job_id, []))
    call.cancel()


async def test_the_stream_ending_cancels_its_jobs(platform: Platform) -> None:
    runtime = ScriptedRuntime(answers=ANSWERS, slot_count=2, token_delay_s=0.05)
    await platform.start_agent(runtime)
    call = _stream(platform)
    await call.write(_start("left-1", "question 1"))
    await call.write(_start("left-2", "question 2"))
    seen: set[str] = set()
    while len(seen) < 2:
        message = await call.read()
        assert isinstance(message, dispatch_pb.RunJobsResponse)
        seen.add(message.job_id)
    call.cancel()
    await eventually(lambda: runtime.cancelled_jobs == 2)
    records = await until(
        lambda: platform.network.service.job_records(["left-1", "left-2"]),
        lambda found: {record.outcome for record in found} == {JobOutcome.CANCELLED},
    )
    assert len(records) == 2


async def test_a_job_ends_with_the_status_its_run_job_call_ends_with(
    platform: Platform,
) -> None:
    await platform.start_agent(ScriptedRuntime())
    call = _stream(platform)
    await call.write(_start("unknown-model", "hi", model="no-such-model"))
    await call.write(_start("fine", "hi"))
    messages = await _until_ended(call, {"unknown-model", "fine"})
    [end] = messages["unknown-model"]
    assert messages["fine"][-1].end.code == 0
    request = _start("unknown-model-call", "hi", model="no-such-model").start
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in dispatch_grpc.DispatchServiceStub(platform.channel).RunJob(
            request, metadata=platform.service
        ):
            pass
    assert Failure.of_status(end.end) == Failure.of_rpc(refused.value)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    call.cancel()


async def test_a_duplicate_start_and_one_beyond_the_limit_are_refused_alone(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_streams, "MAX_JOBS", 2)
    runtime = ScriptedRuntime(answers=ANSWERS, slot_count=4, token_delay_s=0.02)
    await platform.start_agent(runtime)
    call = _stream(platform)
    await call.write(_start("job-1", "question 1"))
    await call.write(_start("job-1", "question 2"))
    await call.write(_start("job-2", "question 2"))
    await call.write(_start("job-3", "question 3"))
    # job-1 twice: the refused start's end, then the running job's.
    messages = await _read_until(
        call,
        lambda got: (
            bool(_ends(got, "job-2") and _ends(got, "job-3")) and len(_ends(got, "job-1")) == 2
        ),
    )
    [refused] = messages["job-3"]
    beyond = Failure.of_status(refused.end)
    assert beyond.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert beyond.info is not None
    assert beyond.info.reason == "RATE_LIMITED"
    duplicate_end, job_end = _ends(messages, "job-1")
    duplicate = Failure.of_status(duplicate_end.end)
    assert duplicate.code == grpc.StatusCode.INVALID_ARGUMENT
    assert duplicate.info is not None
    assert duplicate.info.metadata["field"] == "start.job_id"
    # The first job-1 ran on as if nothing happened, beside job-2.
    assert job_end.end.code == 0
    assert _text(messages["job-1"]) == _answer(1)
    assert _text(messages["job-2"]) == _answer(2)
    assert len(runtime.started_jobs) == 2
    call.cancel()


async def test_only_the_service_token_opens_a_stream(platform: Platform) -> None:
    stub = dispatch_grpc.DispatchServiceStub(platform.channel)
    for metadata in ((), bearer_metadata("not-the-token")):
        # Refused at opening, before any job: writing first would race the refusal.
        call = stub.RunJobs(metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = Failure.of_rpc(refused.value).info
        assert info is not None
        assert info.reason == "INVALID_API_KEY"


async def test_a_request_without_start_or_cancel_ends_the_stream(platform: Platform) -> None:
    call = _stream(platform)
    await call.write(dispatch_pb.RunJobsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_each_job_on_the_stream_counts_as_the_run_job_call_it_stands_for(
    postgres_dsn: str,
) -> None:
    """In the server's gRPC call metrics, by the status its RunJob call would end
    with; the stream itself counts once, when it ends."""
    metrics = PrometheusMetrics()

    def calls(method: str, code: str) -> float | None:
        labels = {"grpc_service": DISPATCH, "grpc_method": method, "grpc_code": code}
        return metrics.registry.get_sample_value("resultity_grpc_server_handled_total", labels)

    def timed(method: str) -> float | None:
        labels = {"grpc_service": DISPATCH, "grpc_method": method}
        return metrics.registry.get_sample_value(
            "resultity_grpc_server_handling_seconds_count", labels
        )

    async with running_platform(postgres_dsn, metrics=metrics) as platform:
        runtime = ScriptedRuntime(answers=ANSWERS, slot_count=4, token_delay_s=0.05)
        await platform.start_agent(runtime)
        call = _stream(platform)
        await call.write(_start("cancelled", "question 0"))
        first = await call.read()
        assert isinstance(first, dispatch_pb.RunJobsResponse)
        await call.write(dispatch_pb.RunJobsRequest(cancel="cancelled"))
        for n in (1, 2):
            await call.write(_start(f"fine-{n}", f"question {n}"))
        await call.write(_start("unknown-model", "hi", model="no-such-model"))
        await _until_ended(call, {"fine-1", "fine-2", "unknown-model"})
        await eventually(lambda: calls("RunJob", "CANCELLED") == 1)
        assert calls("RunJob", "OK") == 2
        assert calls("RunJob", "NOT_FOUND") == 1
        assert timed("RunJob") == 4
        assert timed("RunJobs") is None  # still open
        call.cancel()
        await eventually(lambda: timed("RunJobs") == 1)
    assert calls("RunJobs", "CANCELLED") == 1
    assert timed("RunJob") == 4
