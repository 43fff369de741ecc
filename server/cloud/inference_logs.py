"""Full logs of inference requests, kept only for accounts (and subclouds) that opted
in (server/common/inference_logging.py).

A request's log is what it asked and what it was answered: ``LogCapture`` gathers
the answer from the request's events as they stream by, and hands the finished
entry to the ``InferenceLogWriter`` when the request ends, however it ends. The
writer keeps a bounded queue and one background task that stores batches, so no
request waits for the database: when the queue is full or the store fails, the
entries are dropped, counted and logged, and the requests go on as if nothing
happened. ``LogSweeper`` deletes the entries whose retention has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Protocol

import structlog

from core.errors import DomainError
from core.inference import TokenLogprob
from server.cloud.metrics import CloudMetrics
from server.cloud.requests import (
    ChoiceFinished,
    CompletionEvent,
    CompletionFinished,
    CompletionStarted,
    ContentDelta,
    EmbeddingRequest,
    GenerationRequest,
    ToolCallDelta,
)

log = structlog.get_logger(__name__)

# Entries waiting to be stored; beyond this, new ones are dropped.
DEFAULT_QUEUE_CAPACITY = 1_000
# Entries one INSERT stores.
WRITE_BATCH = 50
# Expired entries one DELETE removes (a sweep repeats it until none are left).
SWEEP_BATCH = 1_000
# Dropped entries are logged at most this often (with the count since).
_DROP_LOG_INTERVAL_S = 10.0

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class InferenceLog:
    # The request's first job.
    log_id: str
    request_id: str
    account_id: str
    subcloud_id: str
    # The request's jobs, in choice order.
    job_ids: tuple[str, ...]
    model: str
    created_at: datetime
    expires_at: datetime
    request: Json
    response: Json


class InferenceLogStore(Protocol):
    async def add(self, entries: Sequence[InferenceLog]) -> None: ...

    async def for_job(self, job_id: str) -> InferenceLog | None:
        """The log of the request ``job_id`` served, if one is kept."""
        ...

    async def delete_expired(self, now: datetime, limit: int) -> int:
        """Deletes up to ``limit`` entries that expired by ``now``; returns how many."""
        ...


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[Json] = field(default_factory=list)
    embedding: list[float] | None = None
    # By call index: id, name and the arguments' JSON text.
    tool_calls: dict[int, Json] = field(default_factory=dict)
    finish_reason: str | None = None


class LogCapture:
    """One request's log, gathered from its events."""

    def __init__(
        self,
        endpoint: str,
        request: GenerationRequest | EmbeddingRequest,
        *,
        request_id: str,
        account_id: str,
        subcloud_id: str,
        retention: timedelta,
    ) -> None:
        self._request: Json = {"endpoint": endpoint, **_plain(dataclasses.asdict(request))}
        self._request_id = request_id
        self._account_id = account_id
        self._subcloud_id = subcloud_id
        self._retention = retention
        self._started: CompletionStarted | None = None
        self._choices: dict[int, _Choice] = {}
        self._finished: CompletionFinished | None = None

    def see(self, event: CompletionEvent) -> None:
        if isinstance(event, ContentDelta):
            choice = self._choices.setdefault(event.index, _Choice())
            choice.text.append(event.text)
            choice.logprobs.extend(_logprob(token) for token in event.logprobs)
            if event.embedding:
                choice.embedding = list(event.embedding)
        elif isinstance(event, ToolCallDelta):
            calls = self._choices.setdefault(event.index, _Choice()).tool_calls
            call = calls.setdefault(event.call_index, {"id": "", "name": "", "arguments": ""})
            call["id"] = event.id or call["id"]
            call["name"] = event.name or call["name"]
            call["arguments"] += event.arguments
        elif isinstance(event, ChoiceFinished):
            self._choices.setdefault(
                event.index, _Choice()
            ).finish_reason = event.finish_reason.value
        elif isinstance(event, CompletionStarted):
            self._started = event
        elif isinstance(event, CompletionFinished):
            self._finished = event

    def entry(self, error: BaseException | None) -> InferenceLog | None:
        """The request's log once it ended (with ``error``, if it failed or its caller
        left); None when no job of it started, so no job record can lead to it."""
        started = self._started
        if started is None or not started.job_ids:
            return None
        return InferenceLog(
            log_id=started.job_ids[0],
            request_id=self._request_id,
            account_id=self._account_id,
            subcloud_id=self._subcloud_id,
            job_ids=started.job_ids,
            model=started.model,
            created_at=started.created,
            expires_at=started.created + self._retention,
            request=self._request,
            response=self._response(started, error),
        )

    def _response(self, started: CompletionStarted, error: BaseException | None) -> Json:
        response: Json = {
            "id": started.completion_id,
            "model": started.model,
            "status": _status(error, finished=self._finished is not None),
            "choices": [_choice(index, c) for index, c in sorted(self._choices.items())],
        }
        if self._finished is not None:
            response["usage"] = dataclasses.asdict(self._finished.usage)
            response["charged_micro_credits"] = self._finished.charged
        if isinstance(error, DomainError):
            response["error"] = {"reason": error.reason.value, "message": error.message}
        return response


def _plain(value: Any) -> Any:
    """``value`` as JSON's types: tuples as lists, enums as their values."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Enum):
        return value.value
    return value


def _status(error: BaseException | None, *, finished: bool) -> str:
    if error is None or (finished and isinstance(error, GeneratorExit)):
        # A caller that stops reading after the last event got the whole answer.
        return "completed"
    if isinstance(error, GeneratorExit | asyncio.CancelledError):
        return "cancelled"
    return "failed"


def _choice(index: int, choice: _Choice) -> Json:
    entry: Json = {"index": index, "finish_reason": choice.finish_reason}
    if choice.embedding is not None:
        entry["embedding"] = choice.embedding
    else:
        entry["text"] = "".join(choice.text)
    if choice.tool_calls:
        entry["tool_calls"] = [call for _, call in sorted(choice.tool_calls.items())]
    if choice.logprobs:
        entry["logprobs"] = choice.logprobs
    return entry


def _logprob(token: TokenLogprob) -> Json:
    return {
        "token": token.token,
        "logprob": token.logprob,
        "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in token.top_logprobs],
    }


class InferenceLogWriter:
    def __init__(
        self,
        store: InferenceLogStore,
        *,
        capacity: int = DEFAULT_QUEUE_CAPACITY,
        batch: int = WRITE_BATCH,
        metrics: CloudMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or CloudMetrics()
        self._queue: asyncio.Queue[InferenceLog] = asyncio.Queue(capacity)
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        # Entries given up (queue full, store failed, shutdown), since start.
        self.dropped = 0
        # Dropped for a full queue since the last warning about it.
        self._unreported = 0
        self._reported_at = -_DROP_LOG_INTERVAL_S

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inference-log-writer")

    async def recorded(
        self, events: AsyncGenerator[CompletionEvent, None], capture: LogCapture
    ) -> AsyncGenerator[CompletionEvent, None]:
        """``events`` as they come, seen by ``capture``; once they end (or the caller
        stops reading) the request's log goes to the queue."""
        error: BaseException | None = None
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    capture.see(event)
                    yield event
        except BaseException as failure:
            error = failure
            raise
        finally:
            entry = capture.entry(error)
            if entry is not None:
                self.submit(entry)

    def submit(self, entry: InferenceLog) -> None:
        """Queues ``entry`` without waiting; drops it when the queue is full."""
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            self._metrics.inference_logs_dropped.inc("queue_full")
            self._unreported += 1
            now = time.monotonic()
            if now - self._reported_at >= _DROP_LOG_INTERVAL_S:
                log.warning(
                    "inference log queue full; entries dropped",
                    count=self._unreported,
                    total=self.dropped,
                )
                self._unreported, self._reported_at = 0, now

    async def close(self, timeout_s: float) -> None:
        """Stores what is queued, for at most ``timeout_s``, then stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        if self._queue.qsize():
            self.dropped += self._queue.qsize()
            self._metrics.inference_logs_dropped.inc("shutdown", amount=self._queue.qsize())
            log.warning("inference logs not stored before shutdown", count=self._queue.qsize())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._store.add(batch)
                self._metrics.inference_logs_written.inc(amount=len(batch))
            except Exception:
                self.dropped += len(batch)
                self._metrics.inference_logs_dropped.inc("store_failed", amount=len(batch))
                log.exception(
                    "storing inference logs failed; dropped", count=len(batch), total=self.dropped
                )
            finally:
                for _ in batch:
                    self._queue.task_done()


class LogSweeper:
    """Deletes the logs whose retention has ended."""

    def __init__(
        self,
        store: InferenceLogStore,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._clock = clock

    async def sweep(self) -> int:
        """Deletes every expired entry; returns how many."""
        now = self._clock()
        deleted = 0
        while True:
            count = await self._store.delete_expired(now, SWEEP_BATCH)
            deleted += count
            if count < SWEEP_BATCH:
                break
        if deleted:
            log.info("expired inference logs deleted", count=deleted)
        return deleted

    async def sweep_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.warning("deleting expired inference logs failed", exc_info=True)
            await asyncio.sleep(interval_s)
