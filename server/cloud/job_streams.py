"""A cloud replica's side of DispatchService.RunJobs (core/job_streams.py).

Per network replica one ``JobLink``: its jobs share one RunJobs stream, opened
when a job first needs it and again after it broke. A job behaves as its RunJob
call would: its events in order; its end raises the error the call would have
raised (``rpc_error``), so the caller's error path is the call's; closing it
early sends its cancel; a stream that breaks fails every job on it with the
stream's error, which sends a job that had no response yet on to the next replica
(``ReplicatedStub.stream``, as for a call). A replica that does not know RunJobs
(one not yet upgraded), and a job beyond the stream's MAX_JOBS or under an id
already on it, run in RunJob calls.
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
from core.grpc_errors import describe_rpc_error, rpc_error
from core.job_streams import ACCEPTED, ACCEPTED_HEADER, MAX_JOBS, RUN_JOB_METHOD
from core.metadata import Metadata
from core.replica_channels import Streamed

log = structlog.get_logger(__name__)

# How long a replica that answered RunJobs with UNIMPLEMENTED gets RunJob calls
# before a stream is tried again (it may have been upgraded meanwhile).
CALLS_ONLY_FOR_S = 60.0

# The status gRPC's asyncio call takes when a write fails under it.
_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")

# What a job's inbox holds: the stream's messages of the job, or the stream's error.
_Inbox = asyncio.Queue[dispatch_pb.RunJobsResponse | grpc.aio.AioRpcError]


class JobLink:
    """The jobs run on one network replica."""

    def __init__(
        self, dispatch: dispatch_grpc.DispatchServiceAsyncStub, metadata: Metadata
    ) -> None:
        self._dispatch = dispatch
        self._metadata = metadata
        self._stream: _JobStream | None = None
        self._calls_until = 0.0

    def run(self, request: dispatch_pb.RunJobRequest) -> Streamed[dispatch_pb.RunJobResponse]:
        """The job's responses, raising the error its RunJob call would; closing the
        generator (cancelling the call) early cancels the job."""
        stream = self._stream_for(request.job_id)
        if stream is None:
            return self._call(request)
        return self._streamed(stream, request)

    async def _streamed(
        self, stream: _JobStream, request: dispatch_pb.RunJobRequest
    ) -> AsyncGenerator[dispatch_pb.RunJobResponse, None]:
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
        # UNIMPLEMENTED ends a stream at its opening, before the job had a response:
        # the job goes to the same replica as a RunJob call, whose metadata carries
        # its trace context.
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
        if time.monotonic() < self._calls_until:
            return None
        stream = self._stream
        if stream is None or stream.broken is not None:
            stream = self._stream = _JobStream(self._dispatch, self._metadata)
        if len(stream.jobs) >= MAX_JOBS or job_id in stream.jobs:
            return None
        return stream

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()


class _JobStream:
    """One RunJobs call and the jobs on it."""

    def __init__(
        self, dispatch: dispatch_grpc.DispatchServiceAsyncStub, metadata: Metadata
    ) -> None:
        # Starts and cancels to send: at most two per job on the stream. None ends them.
        self._outbox: asyncio.Queue[dispatch_pb.RunJobsRequest | None] = asyncio.Queue()
        self.jobs: dict[str, _Inbox] = {}
        self.broken: grpc.aio.AioRpcError | None = None
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

    async def _read(self) -> None:
        error = _stream_error(grpc.StatusCode.UNAVAILABLE, "the network ended the job stream")
        try:
            async for response in self._call:
                inbox = self.jobs.get(response.job_id)
                # None: a job its caller left; what it still sent is nobody's.
                if inbox is not None:
                    if response.HasField("end"):
                        del self.jobs[response.job_id]
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
