"""Runs jobs on the runtime with bounded concurrency and reports their progress.

Jobs beyond the runtime's slots wait in a queue; a cancelled job stops within
one token and reports nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.batching import MAX_BATCH_DELAY_S, MAX_BATCH_TOKENS, TokenBatcher
from agent.runtime.base import (
    Embedding,
    Finished,
    GenerationRequest,
    InvalidRequest,
    PromptTooLong,
    Runtime,
    Started,
    TokenText,
    UnknownModel,
    Waiting,
)
from core.agent_messages import ChunkReport, FailureKind
from core.inference import FinishReason

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class JobRef:
    job_id: str
    epoch: int


class JobSink(Protocol):
    """Where job progress goes (the session turns it into stream messages)."""

    def chunk(self, chunk: ChunkReport) -> None: ...

    def done(
        self,
        job: JobRef,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
    ) -> None:
        """The job finished; ``cached_prompt_tokens`` of its ``prompt_tokens`` came from
        the runtime's cache."""

    def started(self, job: JobRef) -> None:
        """The job took a slot: it runs from now on (before, it waited in the queue)."""

    def waiting(self, job: JobRef) -> None:
        """The started job waits on the runtime's scheduler, which works (repeated
        every few seconds while it waits): not a stall."""

    def failed(self, job: JobRef, kind: FailureKind, message: str, param: str = "") -> None: ...


class JobRunner:
    def __init__(
        self,
        runtime: Runtime,
        sink: JobSink,
        *,
        batch_tokens: int = MAX_BATCH_TOKENS,
        batch_delay_s: float = MAX_BATCH_DELAY_S,
    ) -> None:
        self._batch_tokens = batch_tokens
        self._batch_delay_s = batch_delay_s
        self._runtime = runtime
        self._sink = sink
        self._slots = asyncio.Semaphore(runtime.slots)
        self._tasks: dict[str, tuple[JobRef, asyncio.Task[None]]] = {}
        self._running = 0
        self._tokens = 0
        self._rate_since = time.monotonic()
        self._idle = asyncio.Event()
        self._idle.set()
        # Set whenever a job leaves the runner (its conversation may now be
        # cached); whoever watches for that clears it.
        self.job_ended = asyncio.Event()

    @property
    def active(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._tasks) - self._running

    async def wait_idle(self) -> None:
        """Returns once no job is running or waiting."""
        await self._idle.wait()

    def tokens_per_second(self) -> float:
        """Generated tokens per second since the previous call."""
        now = time.monotonic()
        elapsed, self._rate_since = now - self._rate_since, now
        tokens, self._tokens = self._tokens, 0
        return tokens / elapsed if elapsed > 0 else 0.0

    def start(self, job: JobRef, request: GenerationRequest) -> None:
        if job.job_id in self._tasks:
            log.warning("duplicate assignment ignored", job_id=job.job_id)
            return
        task = asyncio.create_task(self._run(job, request), name=f"job-{job.job_id}")
        self._tasks[job.job_id] = (job, task)
        self._idle.clear()
        task.add_done_callback(lambda _: self._forget(job.job_id))

    def cached_prefixes(self) -> tuple[int, ...]:
        """What the runtime holds for reuse (Runtime.cached_prefixes)."""
        return self._runtime.cached_prefixes()

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self.job_ended.set()
        if not self._tasks:
            self._idle.set()

    def cancel(self, job: JobRef) -> None:
        entry = self._tasks.get(job.job_id)
        if entry is not None and entry[0].epoch == job.epoch:
            entry[1].cancel()

    async def cancel_all(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _send(self, job: JobRef, text: TokenText, prompt_tokens: int, sent: int) -> int:
        """Reports generated text; returns the tokens sent so far."""
        self._tokens += text.token_count
        # The first chunk carries the prompt size, for billing a cancelled job.
        self._sink.chunk(
            ChunkReport(
                job.job_id,
                job.epoch,
                text.text,
                text.token_count,
                prompt_tokens if sent == 0 else 0,
                text.token_ids,
                text.logprobs,
            )
        )
        return sent + text.token_count

    async def _run(self, job: JobRef, request: GenerationRequest) -> None:
        bound = log.bind(job_id=job.job_id, epoch=job.epoch)
        if request.continuation is not None:
            bound.info("continuing a job", delivered_tokens=request.continuation.token_count)
        async with self._slots:
            self._running += 1
            self._sink.started(job)
            sent = 0
            prompt_tokens = 0
            batcher = TokenBatcher(self._batch_tokens, self._batch_delay_s)
            try:
                async for event in self._runtime.generate(request):
                    if isinstance(event, Started):
                        prompt_tokens = event.prompt_tokens
                    elif isinstance(event, Waiting):
                        self._sink.waiting(job)
                    elif isinstance(event, TokenText):
                        merged = batcher.add(event, time.monotonic())
                        if merged is not None:
                            sent = self._send(job, merged, prompt_tokens, sent)
                    elif isinstance(event, Embedding):
                        self._sink.chunk(
                            ChunkReport(
                                job.job_id, job.epoch, "", 0, prompt_tokens, embedding=event.values
                            )
                        )
                    elif isinstance(event, Finished):
                        rest = batcher.flush(time.monotonic())
                        if rest is not None:
                            sent = self._send(job, rest, prompt_tokens, sent)
                        self._sink.done(
                            job,
                            event.reason,
                            event.prompt_tokens,
                            event.completion_tokens,
                            event.cached_prompt_tokens,
                        )
                        bound.info("job done", tokens=event.completion_tokens, reason=event.reason)
            except PromptTooLong as error:
                param = "messages" if request.prompt is None else "prompt"
                self._sink.failed(job, FailureKind.INVALID_REQUEST, str(error), param)
            except InvalidRequest as error:
                self._sink.failed(job, FailureKind.INVALID_REQUEST, str(error), error.param)
            except UnknownModel as error:
                self._sink.failed(job, FailureKind.MODEL_UNAVAILABLE, str(error))
            except asyncio.CancelledError:
                bound.info("job cancelled", tokens=sent)
                raise
            except Exception as error:  # a runtime crash fails this job, not the agent
                bound.exception("job failed")
                self._sink.failed(job, FailureKind.RUNTIME_ERROR, f"runtime error: {error}")
            finally:
                self._running -= 1
