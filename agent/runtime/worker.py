"""A runtime in a worker process the agent supervises.

A runtime runs native code (llama.cpp) on input that strangers choose; a bug
there (a grammar that overflows the parser's stack, an abort in a kernel)
kills the process it runs in. Run in the agent's own process it would end the
node's session and, under ``resultity up``, the platform's only node. Here the
runtime lives in a child process (``worker_main``) behind the same ``Runtime``
protocol:

- generations are proxied over a pipe, one frame per event; the runtime's
  own channel already merges tokens that arrive together, so a frame carries
  what a direct call would have yielded;
- when the worker dies, the generations it was running fail as ordinary
  runtime errors (each job fails; the network moves or reports it), the
  agent's session stays up, and the worker is started again after a jittered
  backoff (``agent.backoff``), reset each time a worker comes up ready. New
  generations wait for the new worker;
- a generation the agent cancels must end within ``cancel_grace_s``;
  otherwise the worker is stuck in native code that does not check for
  cancellation, and it is killed and restarted, so a hang costs what a crash
  costs instead of a slot for ever.

The factory that builds the runtime in the worker is pickled to it, so it must
be a module-level function or a ``functools.partial`` of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from agent.backoff import Backoff
from agent.runtime import worker_protocol as protocol
from agent.runtime.base import (
    Finished,
    GenerationError,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    Runtime,
)

log = structlog.get_logger(__name__)

RuntimeFactory = Callable[[], Awaitable[Runtime]]
# Loading a model may take a while (reading gigabytes from disk).
DEFAULT_START_TIMEOUT_S = 600.0
# A token of a healthy but overloaded node can take seconds; a stuck call never ends.
DEFAULT_CANCEL_GRACE_S = 30.0
_STOP_GRACE_S = 10.0


class WorkerLost(GenerationError):
    """The worker process died while running the generation."""


@dataclass(eq=False)
class _Worker:
    """One worker process and the streams it is running."""

    process: asyncio.subprocess.Process
    streams: dict[int, asyncio.Queue[protocol.FromWorker | WorkerLost]] = field(
        default_factory=dict
    )
    # Streams the agent cancelled that the worker has not ended yet.
    cancelling: set[int] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def send(self, message: object) -> None:
        stdin = self.process.stdin
        if self.alive and stdin is not None and not stdin.is_closing():
            stdin.write(protocol.encode(message))

    def kill(self) -> None:
        if self.alive:
            self.process.kill()


class WorkerRuntime:
    """The ``Runtime`` protocol, served by a supervised worker process."""

    def __init__(
        self,
        factory: RuntimeFactory,
        *,
        backoff: Backoff | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
    ) -> None:
        self._factory = factory
        self._backoff = backoff or Backoff()
        self._start_timeout_s = start_timeout_s
        self._cancel_grace_s = cancel_grace_s
        self._ids = itertools.count(1)
        self._worker: _Worker | None = None
        self._ready = asyncio.Event()
        self._models: list[ModelInfo] = []
        self._slots = 1
        self._cached_prefixes: tuple[int, ...] = ()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdogs: set[asyncio.Task[None]] = set()
        # Worker processes started, the first included (for operators and tests).
        self.starts = 0

    @classmethod
    async def start(
        cls,
        factory: RuntimeFactory,
        *,
        backoff: Backoff | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
    ) -> WorkerRuntime:
        """Starts the worker and waits until its runtime is loaded; raises if the
        first start fails (a bad model path is the operator's to fix, not retried)."""
        runtime = cls(
            factory,
            backoff=backoff,
            start_timeout_s=start_timeout_s,
            cancel_grace_s=cancel_grace_s,
        )
        worker, ready = await runtime._spawn()
        runtime._models, runtime._slots = ready.models, ready.slots
        runtime._serve(worker)
        runtime._supervisor = asyncio.create_task(runtime._supervise(), name="runtime-worker")
        return runtime

    @property
    def models(self) -> list[ModelInfo]:
        return self._models

    @property
    def slots(self) -> int:
        return self._slots

    def cached_prefixes(self) -> tuple[int, ...]:
        """What the worker's runtime last reported (nothing while it restarts)."""
        return self._cached_prefixes

    @property
    def pid(self) -> int | None:
        """The current worker's process id (None while it restarts)."""
        worker = self._worker
        return worker.process.pid if worker is not None and worker.alive else None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        await self._ready.wait()
        worker = self._worker
        if self._closing or worker is None:
            raise GenerationError("runtime is closed")
        stream = next(self._ids)
        queue: asyncio.Queue[protocol.FromWorker | WorkerLost] = asyncio.Queue()
        worker.streams[stream] = queue
        worker.send(protocol.Generate(stream, request))
        ended = False
        try:
            while True:
                message = await queue.get()
                if isinstance(message, WorkerLost):
                    ended = True
                    raise message
                if isinstance(message, protocol.Failed):
                    ended = True
                    raise message.error()
                if isinstance(message, protocol.Ended):
                    ended = True
                    raise GenerationError("the runtime ended the generation without finishing")
                if isinstance(message, protocol.Event):
                    ended = isinstance(message.event, Finished)
                    yield message.event
                    if ended:
                        return
        finally:
            worker.streams.pop(stream, None)
            if not ended and worker.alive:
                worker.send(protocol.Cancel(stream))
                worker.cancelling.add(stream)
                self._watch_cancel(worker, stream)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._ready.set()  # generations waiting for a worker fail instead
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for watchdog in list(self._watchdogs):
            watchdog.cancel()
        worker = self._worker
        if worker is not None:
            await _stop(worker)
            for queue in worker.streams.values():
                queue.put_nowait(WorkerLost("the runtime is closing"))

    # --- supervision ---------------------------------------------------------

    async def _spawn(self) -> tuple[_Worker, protocol.Ready]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.runtime.worker_main",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,
        )
        self.starts += 1
        worker = _Worker(process)
        worker.send(self._factory)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self._start_timeout_s):
                ready = await protocol.read(process.stdout)
        except TimeoutError:
            ready = None
        if not isinstance(ready, protocol.Ready):
            worker.kill()
            code = await process.wait()
            raise GenerationError(f"the runtime worker failed to start (exit code {code})")
        log.info("runtime worker ready", pid=process.pid, slots=ready.slots)
        return worker, ready

    def _serve(self, worker: _Worker) -> None:
        self._worker = worker
        self._reader = asyncio.create_task(self._read(worker), name="runtime-worker-reader")
        self._backoff.reset()
        self._ready.set()

    async def _read(self, worker: _Worker) -> None:
        """Routes the worker's messages to their streams until its pipe ends."""
        stdout = worker.process.stdout
        assert stdout is not None
        while (message := await protocol.read(stdout)) is not None:
            if isinstance(message, protocol.CachedPrefixes):
                self._cached_prefixes = message.prefixes
                continue
            if isinstance(message, protocol.Ended):
                worker.cancelling.discard(message.stream)
            stream = getattr(message, "stream", None)
            queue = worker.streams.get(stream) if isinstance(stream, int) else None
            if queue is not None:
                queue.put_nowait(message)  # type: ignore[arg-type]

    async def _supervise(self) -> None:
        """Restarts the worker, with backoff, whenever it exits."""
        while not self._closing:
            worker = self._worker
            assert worker is not None
            code = await worker.process.wait()
            if self._reader is not None:
                await self._reader
            self._ready.clear()
            self._cached_prefixes = ()  # a new worker starts with an empty cache
            lost = WorkerLost(f"the runtime worker exited (code {_describe(code)})")
            for queue in worker.streams.values():
                queue.put_nowait(lost)
            log.error(
                "runtime worker exited; restarting",
                pid=worker.process.pid,
                code=_describe(code),
                jobs_failed=len(worker.streams),
            )
            while not self._closing:
                delay = self._backoff.next_delay()
                await asyncio.sleep(delay)
                try:
                    replacement, _ = await self._spawn()
                except GenerationError as error:
                    log.error("runtime worker restart failed", error=str(error))
                    continue
                self._serve(replacement)
                break

    def _watch_cancel(self, worker: _Worker, stream: int) -> None:
        async def watch() -> None:
            await asyncio.sleep(self._cancel_grace_s)
            if stream in worker.cancelling and worker.alive:
                log.error(
                    "runtime worker did not stop a cancelled generation; killing it",
                    pid=worker.process.pid,
                    grace_s=self._cancel_grace_s,
                )
                worker.kill()

        task = asyncio.create_task(watch())
        self._watchdogs.add(task)
        task.add_done_callback(self._watchdogs.discard)


async def _stop(worker: _Worker) -> None:
    """Closes the worker's stdin (it closes its runtime and exits), then kills it if
    it takes too long."""
    stdin = worker.process.stdin
    if stdin is not None and not stdin.is_closing():
        stdin.close()
    try:
        async with asyncio.timeout(_STOP_GRACE_S):
            await worker.process.wait()
    except TimeoutError:
        worker.kill()
        await worker.process.wait()


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code}, {signal.Signals(-code).name}"
    return str(code)
