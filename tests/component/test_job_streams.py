"""A cloud replica's jobs on a network replica's RunJobs streams (the network
client against replicas whose jobs are scripted): each job's events its own and in
order, a cancel that ends one job alone, a job's error the one its RunJob call
raises, a broken stream failing its jobs (or moving one that had no response yet
to the next replica), RunJob calls for a replica without RunJobs, a link's streams
spread over every address of its target, and a stream past its age replaced
while its jobs run on to their end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import grpc
import pytest
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core import channels
from core.errors import DomainError, InsufficientQuota, NoCapacity
from core.grpc_errors import translate_errors
from core.inference import ChatMessage, ChatRole, GenerationSpec, JobDelta, JobEvent, Sampling
from core.job_streams import ACCEPTED, ACCEPTED_HEADER
from core.metadata import bearer_metadata
from core.replica_channels import ReplicaChannels
from server.cloud import job_streams
from server.cloud.clients import GrpcNetworkClient
from server.cloud.job_streams import JobLink, pool_size
from server.network.job_streams import serve_jobs
from tests.harness import eventually

TOKEN = "service-token"
SPEC = GenerationSpec(
    model="scripted",
    messages=(ChatMessage(ChatRole.USER, "hello"),),
    sampling=Sampling(max_tokens=8),
    max_prompt_tokens=100,
)
DELTAS = 5


class ScriptedReplica(dispatch_grpc.DispatchServiceServicer):
    """A network replica whose job answers by its id: ``fail-*`` with its error before
    any event, ``boom-*`` with an unexpected one; ``hold-*`` waits, once assigned,
    until the replica releases its jobs, ``silent-*`` before it is assigned; then
    its deltas (``<job id>:<n>``) and its end."""

    def __init__(self) -> None:
        self.streams = 0
        # Streams that ended as their caller's requests did (half-closed).
        self.closed = 0
        self.calls = 0
        self.listed = 0
        self.jobs: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()
        # Set: the stream fails, unreachable, instead of sending its next message.
        self.breaking = False

    @translate_errors
    async def RunJob(
        self, request: dispatch_pb.RunJobRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[dispatch_pb.RunJobResponse]:
        self.calls += 1
        async for response in self._job(request):
            yield response

    async def RunJobs(
        self,
        request_iterator: AsyncIterator[dispatch_pb.RunJobsRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[dispatch_pb.RunJobsResponse]:
        self.streams += 1
        await context.send_initial_metadata(((ACCEPTED_HEADER, ACCEPTED),))
        async with contextlib.aclosing(serve_jobs(request_iterator, self._job)) as responses:
            async for response in responses:
                if self.breaking:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
                yield response
        self.closed += 1

    async def ListModels(
        self,
        request: dispatch_pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> dispatch_pb.ListModelsResponse:
        self.listed += 1
        return dispatch_pb.ListModelsResponse()

    async def _job(
        self, request: dispatch_pb.RunJobRequest
    ) -> AsyncGenerator[dispatch_pb.RunJobResponse, None]:
        job_id = request.job_id
        self.jobs.append(job_id)
        if job_id.startswith("fail"):
            raise InsufficientQuota("no credits left", metadata={"account": "a"})
        if job_id.startswith("boom"):
            raise ValueError("scripted crash")
        try:
            if job_id.startswith("silent"):
                await self.release.wait()
            yield dispatch_pb.RunJobResponse(assigned=dispatch_pb.JobAssigned(node_id=job_id))
            if job_id.startswith("hold"):
                await self.release.wait()
            for index in range(DELTAS):
                await asyncio.sleep(0)  # the jobs on a stream interleave
                yield dispatch_pb.RunJobResponse(
                    delta=dispatch_pb.TokenDelta(text=f"{job_id}:{index} ", token_count=1)
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(job_id)
            raise
        yield dispatch_pb.RunJobResponse(
            finished=dispatch_pb.JobFinished(finish_reason=common_pb.FINISH_REASON_STOP)
        )


def _only_run_job(replica: ScriptedReplica) -> grpc.GenericRpcHandler:
    """The dispatch service of a replica that knows RunJob and not RunJobs."""

    async def run_job(
        request: dispatch_pb.RunJobRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[dispatch_pb.RunJobResponse]:
        async for response in replica.RunJob(request, context):
            yield response

    return grpc.method_handlers_generic_handler(
        "resultity.network.v1.DispatchService",
        {
            "RunJob": grpc.unary_stream_rpc_method_handler(
                run_job,
                request_deserializer=dispatch_pb.RunJobRequest.FromString,
                response_serializer=dispatch_pb.RunJobResponse.SerializeToString,
            )
        },
    )


@contextlib.asynccontextmanager
async def _serving(replica: ScriptedReplica, *, streams: bool = True) -> AsyncIterator[str]:
    server = grpc.aio.server()
    if streams:
        dispatch_grpc.add_DispatchServiceServicer_to_server(replica, server)
    else:
        server.add_generic_rpc_handlers((_only_run_job(replica),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def _client(*targets: str) -> AsyncIterator[GrpcNetworkClient]:
    replicas = ReplicaChannels(",".join(targets))
    client = GrpcNetworkClient(replicas, TOKEN)
    try:
        yield client
    finally:
        await client.close()
        await replicas.close()


async def _run(client: GrpcNetworkClient, job_id: str) -> list[JobEvent]:
    events: list[JobEvent] = []
    async with contextlib.aclosing(client.run_job(job_id, SPEC)) as batches:
        async for ready in batches:
            events.extend(ready)
    return events


def _texts(events: Sequence[JobEvent]) -> list[str]:
    return [event.text for event in events if isinstance(event, JobDelta)]


def _expected(job_id: str) -> list[str]:
    return [f"{job_id}:{index} " for index in range(DELTAS)]


async def test_concurrent_jobs_share_one_stream_each_with_its_own_events_in_order() -> None:
    replica = ScriptedReplica()
    async with _serving(replica) as target, _client(target) as client:
        ids = [f"job-{n}" for n in range(40)]
        results = await asyncio.gather(*(_run(client, job_id) for job_id in ids))
        # A later job takes the same stream.
        assert _texts(await _run(client, "later")) == _expected("later")
    for job_id, events in zip(ids, results, strict=True):
        assert _texts(events) == _expected(job_id)
        assert events[0].node_id == job_id  # type: ignore[union-attr]
    assert (replica.streams, replica.calls) == (1, 0)
    assert replica.cancelled == []


async def test_leaving_one_job_cancels_it_alone() -> None:
    replica = ScriptedReplica()
    async with _serving(replica) as target, _client(target) as client:
        held = [asyncio.create_task(_run(client, f"hold-{n}")) for n in range(3)]
        left = client.run_job("hold-left", SPEC)
        assert [event.node_id for event in await anext(left)] == ["hold-left"]  # type: ignore[union-attr]
        await left.aclose()
        await eventually(lambda: replica.cancelled == ["hold-left"])
        replica.release.set()
        results = await asyncio.gather(*held)
    assert [_texts(events) for events in results] == [_expected(f"hold-{n}") for n in range(3)]
    assert replica.cancelled == ["hold-left"]
    assert replica.streams == 1


async def _error_of(client: GrpcNetworkClient, job_id: str) -> DomainError:
    with pytest.raises(DomainError) as raised:
        await _run(client, job_id)
    return raised.value


@pytest.mark.parametrize("job_id", ["fail-1", "boom-1"])
async def test_a_job_fails_with_the_error_its_run_job_call_raises(job_id: str) -> None:
    streamed, called = ScriptedReplica(), ScriptedReplica()
    async with (
        _serving(streamed) as with_streams,
        _serving(called, streams=False) as without,
        _client(with_streams) as on_stream,
        _client(without) as in_calls,
    ):
        error = await _error_of(on_stream, job_id)
        # Its neighbour on the stream runs on.
        assert _texts(await _run(on_stream, "after")) == _expected("after")
        expected = await _error_of(in_calls, job_id)
    assert (streamed.streams, streamed.calls, called.calls) == (1, 0, 1)
    assert type(error) is type(expected)
    assert (error.message, error.metadata) == (expected.message, expected.metadata)
    if job_id.startswith("fail"):
        assert isinstance(error, InsufficientQuota)
        assert error.metadata == {"account": "a"}


async def test_a_broken_stream_fails_its_answered_jobs_and_moves_the_others_on() -> None:
    breaking, other = ScriptedReplica(), ScriptedReplica()
    async with (
        _serving(breaking) as first,
        _serving(other) as second,
        _client(first, second) as client,
    ):
        # Replicas are taken in turn: the first job and the third go to the first.
        answered = asyncio.create_task(_run(client, "hold-1"))
        await eventually(lambda: "hold-1" in breaking.jobs)
        elsewhere = asyncio.create_task(_run(client, "job-2"))
        silent = asyncio.create_task(_run(client, "silent-3"))
        await eventually(lambda: "silent-3" in breaking.jobs)
        assert _texts(await elsewhere) == _expected("job-2")
        breaking.breaking = True
        breaking.release.set()  # hold-1's next delta finds the stream breaking
        with pytest.raises(NoCapacity):
            await answered
        # silent-3 had no response: it ran again on the other replica, under its id.
        other.release.set()
        assert _texts(await silent) == _expected("silent-3")
        assert other.jobs == ["job-2", "silent-3"]
        # The broken replica is tried last for a while: the next jobs go to the other.
        breaking.breaking = False
        for job_id in ("job-4", "job-5"):
            assert _texts(await _run(client, job_id)) == _expected(job_id)
    assert other.jobs[2:] == ["job-4", "job-5"]
    assert breaking.streams == 1


async def test_a_replica_without_run_jobs_gets_run_job_calls() -> None:
    replica = ScriptedReplica()
    async with _serving(replica, streams=False) as target, _client(target) as client:
        ids = [f"job-{n}" for n in range(5)]
        results = await asyncio.gather(*(_run(client, job_id) for job_id in ids))
        later = await _run(client, "later")
    for job_id, events in zip([*ids, "later"], [*results, later], strict=True):
        assert _texts(events) == _expected(job_id)
    assert replica.calls == 6


async def _texts_on(link: JobLink, job_id: str) -> list[str]:
    return [
        response.delta.text
        async for response in link.run(dispatch_pb.RunJobRequest(job_id=job_id))
        if response.HasField("delta")
    ]


async def test_a_links_streams_spread_its_jobs_over_every_address_of_its_target() -> None:
    first, second = ScriptedReplica(), ScriptedReplica()
    async with _serving(first) as one, _serving(second) as two:
        target = f"ipv4:{one},{two}"
        async with channels.channel(target) as channel:
            dispatch = dispatch_grpc.DispatchServiceStub(channel)
            # Calls until both addresses answered one: round_robin takes an address
            # once it connected. The timeout only bounds a channel that never does.
            async with asyncio.timeout(10):
                while not (first.listed and second.listed):
                    await dispatch.ListModels(dispatch_pb.ListModelsRequest())
            link = JobLink(dispatch, bearer_metadata(TOKEN), pool_size(target))
            ids = [f"hold-{n}" for n in range(4)]
            held = [asyncio.create_task(_texts_on(link, job_id)) for job_id in ids]
            await eventually(lambda: len(first.jobs) + len(second.jobs) == len(ids))
            first.release.set()
            second.release.set()
            results = await asyncio.gather(*held)
            await link.close()
    assert results == [_expected(job_id) for job_id in ids]
    # Two streams, one per address, each given half of the jobs (the fewest first).
    assert (first.streams, second.streams) == (1, 1)
    assert (len(first.jobs), len(second.jobs)) == (2, 2)
    assert first.cancelled == second.cancelled == []


async def test_a_stream_past_its_age_takes_no_new_job_and_closes_after_its_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every stream is past its age by the next job.
    monkeypatch.setattr(job_streams, "STREAM_AGE_S", 0.0)
    replica = ScriptedReplica()
    async with _serving(replica) as target, _client(target) as client:
        old = asyncio.create_task(_run(client, "hold-old"))
        await eventually(lambda: "hold-old" in replica.jobs)
        # A new job goes on a new stream; the old one stays open for its job.
        assert _texts(await _run(client, "job-new")) == _expected("job-new")
        assert (replica.streams, replica.closed) == (2, 0)
        replica.release.set()
        assert _texts(await old) == _expected("hold-old")
        await eventually(lambda: replica.closed == 1)
        # The next job retires the second stream, which had no job left: it closes.
        assert _texts(await _run(client, "job-later")) == _expected("job-later")
        await eventually(lambda: replica.closed == 2)
        assert replica.streams == 3
    assert replica.jobs == ["hold-old", "job-new", "job-later"]
    assert (replica.cancelled, replica.calls) == ([], 0)
