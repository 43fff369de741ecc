"""The runtime worker process: loads a runtime and runs the agent's generations.

Started by ``agent.runtime.worker`` as ``python -m agent.runtime.worker_main``.
Its stdin carries the runtime factory (the first frame), then Generate and
Cancel messages; the protocol's replies go out on what was its stdout, while
file descriptor 1 is pointed at stderr, so nothing a library prints (llama.cpp
writes to stdout on some paths) can corrupt a frame. The end of stdin (the
agent closed it, or died) stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import cast

import structlog

from agent.runtime import worker_protocol as protocol
from agent.runtime.base import Finished, GenerationEvent, Runtime
from core import event_loop

log = structlog.get_logger(__name__)

RuntimeFactory = Callable[[], Awaitable[Runtime]]


class _Worker:
    def __init__(self, runtime: Runtime, writer: asyncio.StreamWriter) -> None:
        self._runtime = runtime
        self._writer = writer
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._prefixes: tuple[int, ...] = ()

    def send(self, message: protocol.FromWorker) -> None:
        self._writer.write(protocol.encode(message))

    def handle(self, message: object) -> None:
        if isinstance(message, protocol.Generate):
            task = asyncio.create_task(self._run(message.stream, message))
            self._streams[message.stream] = task
        elif isinstance(message, protocol.Cancel):
            running = self._streams.get(message.stream)
            if running is not None:
                running.cancel()

    async def _run(self, stream: int, message: protocol.Generate) -> None:
        try:
            # Runtimes' generate() are async generators: closed here, not by the GC.
            generation = cast(
                AsyncGenerator[GenerationEvent, None], self._runtime.generate(message.request)
            )
            async with contextlib.aclosing(generation) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        self._advertise()
                        self.send(protocol.Event(stream, event))
                        break
                    self.send(protocol.Event(stream, event))
                    await self._writer.drain()
        except asyncio.CancelledError:
            pass  # the agent gave the stream up; it expects nothing more but Ended
        except Exception as error:  # reported to the agent as this generation's failure
            self.send(protocol.Failed.of(stream, error))
        finally:
            self._streams.pop(stream, None)
            self._advertise()
            self.send(protocol.Ended(stream))

    def _advertise(self) -> None:
        prefixes = self._runtime.cached_prefixes()
        if prefixes != self._prefixes:
            self._prefixes = prefixes
            self.send(protocol.CachedPrefixes(prefixes))

    async def stop(self) -> None:
        for task in list(self._streams.values()):
            task.cancel()
        for task in list(self._streams.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._runtime.close()


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
    )
    transport, stream_protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), replies
    )
    writer = asyncio.StreamWriter(transport, stream_protocol, None, loop)
    factory = await protocol.read(reader)
    if not callable(factory):
        raise SystemExit("the runtime worker expects a runtime factory first")
    runtime: Runtime = await factory()
    worker = _Worker(runtime, writer)
    worker.send(protocol.Ready(runtime.models, runtime.slots))
    try:
        while (message := await protocol.read(reader)) is not None:
            worker.handle(message)
    finally:
        await worker.stop()
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()


def main() -> None:
    # Ctrl-C reaches the whole process group; the agent decides when the worker
    # stops (by closing its stdin), after draining its jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    event_loop.run(_serve())


if __name__ == "__main__":
    main()
