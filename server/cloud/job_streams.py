"""A cloud replica's side of DispatchService.RunJobs (core/job_streams.py).

Per network replica one ``JobLink``: its jobs share a few RunJobs streams (a pool,
``pool_size``), each opened when a job first needs it and again after it broke. A
replica's target may name several pods (a DNS name of a headless Service):
round_robin places each stream, a call of its own, on the next of them, and a new
job takes the stream with the fewest jobs, so one replica's jobs enter the network
through several pods rather than one. A stream older than ``STREAM_AGE_S`` takes
no new jobs: a fresh one takes its place (on a connection opened since, which
reaches pods that came meanwhile) and the old one is half-closed once its last
job ended, so that none is cut.

A job behaves as its RunJob call would: its events in order; its end raises the
error the call would have raised (``rpc_error``), so the caller's error path is
the call's; closing it early sends its cancel; a stream that breaks fails every
job on it with the stream's error, which sends a job that had no response yet on
to the next replica (``ReplicatedStub.stream``, as for a call). A replica that
does not know RunJobs (one not yet upgraded), and a job beyond its stream's
MAX_JOBS or under an id already on it, run in RunJob calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncGenerator
from typing import cast

import grpc
import structlog
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core import tracing
from core.channels import MAX_CONNECTION_AGE_MS, addresses
from core.grpc_errors import describe_rpc_error, rpc_error
from core.job_streams import ACCEPTED, ACCEPTED_HEADER, MAX_JOBS, RUN_JOB_METHOD
from core.metadata import Metadata
from core.replica_channels import Streamed

log = structlog.get_logger(__name__)

# How long a replica that answered RunJobs with UNIMPLEMENTED gets RunJob calls
# before a stream is tried again (it may have been upgraded meanwhile).
CALLS_ONLY_FOR_S = 60.0

# The streams taking jobs on one link at most: a cloud replica's jobs enter the
# network through up to four pods (deploy/kubernetes runs two), and as each cloud
# replica's round_robin starts at an address of its own, several together reach
# more. A stream more costs a call per STREAM_AGE_S and a task on each side,
# nothing per job; beyond a few pods the network's share per pod is already small.
STREAMS = 4

# A stream this old takes no new jobs: as old as a connection the network sends
# away (core/channels.py), so that a fresh stream finds the pods resolved since.
STREAM_AGE_S = MAX_CONNECTION_AGE_MS / 1000

# The status gRPC's asyncio call takes when a write fails under it.
_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")

# What a job's inbox holds: the stream's messages of the job, or the stream's error.
_Inbox = asyncio.Queue[dispatch_pb.RunJobsResponse | grpc.aio.AioRpcError]


def pool_size(target: str) -> int:
    """The streams for a replica's ``target``: one per address it names (streams
    beyond would share a pod), at most STREAMS; STREAMS for a DNS name, which may
    stand for as many pods."""
    named = addresses(target)
    return STREAMS if named is None else min(named, STREAMS)


class JobLink:
    """The jobs run on one network replica: new ones on ``streams`` streams at most."""

    def __init__(
        self, dispatch: dispatch_grpc.DispatchServiceAsyncStub, metadata: Metadata, streams: int
    ) -> None:
        self._dispatch = dispatch
        self._metadata = metadata
        self._size = streams
        # The streams taking new jobs, and the turn that breaks a tie between them.
        self._streams: list[_JobStream] = []
        self._turn = 0
        # Streams past their age, until their last job ended (closed with the link).
        self._retired: list[_JobStream] = []
        self._calls_until = 0.0

    def run(self, request: dispatch_pb.RunJobRequest) -> Streamed[dispatch_pb.RunJobResponse]:
        """The job's responses, raising the error its RunJob call would; closing the
        generator (cancelling the call) early cancels the job."""
        if time.monotonic() < self._calls_until:
            return self._call(request)
        return self._streamed(request)

    async def _streamed(
        self, request: dispatch_pb.RunJobRequest
    ) -> AsyncGenerator[dispatch_pb.RunJobResponse, None]:
        # Chosen as the job starts, so that it starts on a stream still taking jobs.
        stream = self._stream_for(request.job_id)
        if stream is not None:
            try:
                with tracing.stream_call_span(RUN_JOB_METHOD) as carrier:
                    request.trace_context.update(carrier)
                    inbox = stream.start(request)
                    try:
                        while (response := await stream.receive(inbox)) is not None:
                            yield response
                    finally:
                        stream.leave(request.job_id, inbox)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._calls_until = time.monotonic() + CALLS_ONLY_FOR_S
            # UNIMPLEMENTED ends a stream at its opening, before the job had a
            # response: the job goes to the same replica as a RunJob call, whose
            # metadata carries its trace context.
            request.ClearField("trace_context")
        call = self._call(request)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    def _call(
        self, request: dispatch_pb.RunJobRequest
    ) -> grpc.aio.UnaryStreamCall[dispatch_pb.RunJobRequest, dispatch_pb.RunJobResponse]:
        return self._dispatch.RunJob(request, metadata=self._metadata)

    def _stream_for(self, job_id: str) -> _JobStream | None:
        """The stream to run the job on; None: a RunJob call of its own."""
        streams = self._taking()
        if len(streams) < self._size:
            stream = _JobStream(self._dispatch, self._metadata)
            streams.append(stream)
        else:
            self._turn = (self._turn + 1) % len(streams)
            stream = streams[self._turn]
            for other in streams:
                if len(other.jobs) < len(stream.jobs):
                    stream = other
        if len(stream.jobs) >= MAX_JOBS or job_id in stream.jobs:
            return None
        return stream

    def _taking(self) -> list[_JobStream]:
        """The streams that take new jobs: a broken one goes, one past its age retires."""
        oldest = time.monotonic() - STREAM_AGE_S
        streams = self._streams
        if all(s.broken is None and s.opened > oldest for s in streams):
            return streams
        self._retired = [s for s in self._retired if not s.ended]
        for stream in streams:
            if stream.broken is None and stream.opened <= oldest:
                stream.retire()
                self._retired.append(stream)
        self._streams = [s for s in streams if s.broken is None and s.opened > oldest]
        return self._streams

    async def close(self) -> None:
        for stream in [*self._streams, *self._retired]:
            await stream.close()


class _JobStream:
    """One RunJobs call and the jobs on it."""

    def __init__(
        self, dispatch: dispatch_grpc.DispatchServiceAsyncStub, metadata: Metadata
    ) -> None:
        # Starts and cancels to send: at most two per job on the stream. None ends them.
        self._outbox: asyncio.Queue[dispatch_pb.RunJobsRequest | None] = asyncio.Queue()
        self.jobs: dict[str, _Inbox] = {}
        self.broken: grpc.aio.AioRpcError | None = None
        self.opened = time.monotonic()
        # Set: the stream takes no new job and ends its requests after its last job
        # ends (their end cancels the jobs still on the stream).
        self._retired = False
        self._call = dispatch.RunJobs(self._requests(), metadata=metadata)
        # The stream outlives the job that opened it: its reader logs no job's context.
        self._reader = asyncio.create_task(
            self._read(), name="run-jobs-stream", context=contextvars.Context()
        )

    async def _requests(self) -> AsyncGenerator[dispatch_pb.RunJobsRequest, None]:
        headers = await self._call.initial_metadata()
        if headers.get(ACCEPTED_HEADER) != ACCEPTED:
            await self._call.code()  # refused: nothing to write before its end
            return
        while (request := await self._outbox.get()) is not None:
            yield request

    def start(self, request: dispatch_pb.RunJobRequest) -> _Inbox:
        # Unbounded, yet bounded by the job: what the network relayed and the caller
        # has not read yet, a message per event: its assignment, its moves, its end
        # and a delta per token of its max_tokens at most. (A RunJob call's flow
        # control would hold the network back instead; a shared stream cannot, for
        # one slow reader would hold every job on it.)
        inbox: _Inbox = asyncio.Queue()
        if self.broken is not None:
            inbox.put_nowait(self.broken)
        else:
            self.jobs[request.job_id] = inbox
            self._outbox.put_nowait(dispatch_pb.RunJobsRequest(start=request))
        return inbox

    async def receive(self, inbox: _Inbox) -> dispatch_pb.RunJobResponse | None:
        """The job's next event; None after its last; raises its call's error."""
        message = await inbox.get()
        if isinstance(message, grpc.aio.AioRpcError):
            # Each job raises an error of its own (a raise writes its traceback).
            raise _copy(message)
        if message.HasField("end"):
            if message.end.code:
                raise rpc_error(message.end)
            return None
        return message.event

    def leave(self, job_id: str, inbox: _Inbox) -> None:
        """The job's caller is done with it: a job still running is cancelled."""
        if self.jobs.get(job_id) is inbox:
            del self.jobs[job_id]
            self._outbox.put_nowait(dispatch_pb.RunJobsRequest(cancel=job_id))
            self._end_if_done()

    def retire(self) -> None:
        """Takes no new job; half-closes once the jobs on it ended."""
        self._retired = True
        self._end_if_done()

    def _end_if_done(self) -> None:
        if self._retired and not self.jobs:
            self._outbox.put_nowait(None)

    @property
    def ended(self) -> bool:
        return self._reader.done()

    async def _read(self) -> None:
        error = _stream_error(grpc.StatusCode.UNAVAILABLE, "the network ended the job stream")
        try:
            async for response in self._call:
                inbox = self.jobs.get(response.job_id)
                # None: a job its caller left; what it still sent is nobody's.
                if inbox is not None:
                    if response.HasField("end"):
                        del self.jobs[response.job_id]
                        self._end_if_done()
                    inbox.put_nowait(response)
        except grpc.aio.AioRpcError as broken:
            error = broken
            if (error.code(), error.details()) == _WRITE_FAILED:
                # The stream ended under a start or cancel being written (the transport
                # broke, or the replica went away): its own status is lost.
                error = _stream_error(grpc.StatusCode.UNAVAILABLE, "the job stream broke")
        except asyncio.CancelledError:
            error = _stream_error(grpc.StatusCode.CANCELLED, "the job stream was closed")
            raise
        finally:
            self.broken = error
            self._outbox.put_nowait(None)
            jobs, self.jobs = self.jobs, {}
            for inbox in jobs.values():
                inbox.put_nowait(error)
            if jobs:
                log.warning("job stream broken", error=describe_rpc_error(error), jobs=len(jobs))

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def _stream_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def _copy(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        error.code(),
        error.initial_metadata(),
        # Typed as a tuple by the stubs; the call's Metadata.
        cast(grpc.aio.Metadata, error.trailing_metadata()),
        error.details(),
        error.debug_error_string(),
    )
