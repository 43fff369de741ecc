"""A network replica's side of DispatchService.RunJobs (core/job_streams.py).

Each start runs its job exactly as a RunJob call would (``run``: the servicer's
path of RunJob), in a task of its own; its responses go onto the one stream tagged
with its id, in order, then its end: OK, or the status the call would have failed
with. A cancel, or the caller's end of the stream, cancels the job's task as a
call's cancellation cancels its handler: its cleanup (the cancel on its node) runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import google.rpc.status_pb2 as status_pb2
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

from core.batch_calls import failure_status
from core.errors import DomainError, InvalidArgument, RateLimited
from core.job_streams import MAX_JOBS

JobRun = Callable[[dispatch_pb.RunJobRequest], AsyncGenerator[dispatch_pb.RunJobResponse, None]]

# Messages the jobs have ready that the stream has not sent yet. Beyond them a job
# waits to put its next one: the stream's flow control holds its jobs together, as
# the connection's holds calls that share it.
OUTBOX_SIZE = 256
_ENDED_OK = status_pb2.Status()


@dataclass(frozen=True, slots=True)
class _Closed:
    """The caller's requests ended (None), or reading them failed (a request that
    breaks the stream's contract: a DomainError)."""

    error: Exception | None


async def serve_jobs(
    requests: AsyncIterator[dispatch_pb.RunJobsRequest], run: JobRun
) -> AsyncIterator[dispatch_pb.RunJobsResponse]:
    """The stream's responses: every job's, as they come, until the caller's requests
    end (or the stream is cancelled); then its jobs still running are cancelled."""
    jobs = _Jobs(run)
    reader = asyncio.create_task(jobs.read(requests), name="run-jobs-reader")
    try:
        while True:
            message = await jobs.outbox.get()
            if isinstance(message, _Closed):
                if message.error is not None:
                    raise message.error
                return
            yield message
    finally:
        reader.cancel()
        await jobs.cancel_all()


class _Jobs:
    def __init__(self, run: JobRun) -> None:
        self._run = run
        self._running: dict[str, asyncio.Task[None]] = {}
        # Every job's task until it is done, a cancelled one's cleanup included.
        self._tasks: set[asyncio.Task[None]] = set()
        self.outbox: asyncio.Queue[dispatch_pb.RunJobsResponse | _Closed] = asyncio.Queue(
            OUTBOX_SIZE
        )

    async def read(self, requests: AsyncIterator[dispatch_pb.RunJobsRequest]) -> None:
        closed = _Closed(None)
        try:
            async for request in requests:
                await self._take(request)
        except Exception as error:
            closed = _Closed(error)
        await self.outbox.put(closed)

    async def _take(self, request: dispatch_pb.RunJobsRequest) -> None:
        kind = request.WhichOneof("request")
        if kind == "start":
            await self._start(request.start)
        elif kind == "cancel":
            # A job that already ended has nothing left to cancel.
            task = self._running.pop(request.cancel, None)
            if task is not None:
                task.cancel()
        else:
            raise InvalidArgument("a RunJobsRequest carries a start or a cancel", field="request")

    async def _start(self, start: dispatch_pb.RunJobRequest) -> None:
        job_id = start.job_id
        if job_id in self._running:
            await self._end(
                job_id,
                InvalidArgument(
                    f"job {job_id!r} is already running on this stream", field="start.job_id"
                ),
            )
        elif len(self._running) >= MAX_JOBS:
            await self._end(
                job_id,
                RateLimited(
                    f"a RunJobs stream runs at most {MAX_JOBS} jobs at once", retry_after_s=1
                ),
            )
        else:
            task = asyncio.create_task(self._job(start), name="run-jobs-job")
            self._running[job_id] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _job(self, start: dispatch_pb.RunJobRequest) -> None:
        job_id = start.job_id
        try:
            async with contextlib.aclosing(self._run(start)) as responses:
                async for response in responses:
                    await self.outbox.put(
                        dispatch_pb.RunJobsResponse(job_id=job_id, event=response)
                    )
        except Exception as error:
            end = failure_status(error)
        else:
            end = _ENDED_OK
        finally:
            # Cancelled (by a cancel, or the stream's end): nothing more is sent.
            if self._running.get(job_id) is asyncio.current_task():
                del self._running[job_id]
        await self.outbox.put(dispatch_pb.RunJobsResponse(job_id=job_id, end=end))

    async def _end(self, job_id: str, error: DomainError) -> None:
        await self.outbox.put(dispatch_pb.RunJobsResponse(job_id=job_id, end=failure_status(error)))

    async def cancel_all(self) -> None:
        """Cancels the jobs still running and waits for their cleanup (and that of
        those cancelled before)."""
        tasks = list(self._tasks)
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
