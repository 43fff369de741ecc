"""Writes off the caller's path: the newest value of each key, in batches.

``put`` never waits. One background task writes what is pending, one batch at a
time, so writes of a key land in the order they were put; values put for a key
while it waits are coalesced into the newest. A batch that fails is retried
(values put for its keys meanwhile replace it), so nothing put is dropped while
the process runs; ``close`` writes what is left before the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class WriteBehind(Generic[K, V]):
    def __init__(
        self,
        name: str,
        write: Callable[[list[V]], Awaitable[None]],
        *,
        max_batch: int = 500,
        retry_s: float = 1.0,
    ) -> None:
        self._name = name
        self._write = write
        self._max_batch = max_batch
        self._retry_s = retry_s
        self._pending: dict[K, V] = {}
        self._in_flight: dict[K, V] = {}
        # Set by put; the writer waits on it when nothing is pending.
        self._wake = asyncio.Event()
        # Notified by the writer after each batch, for flush.
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"write-behind-{self._name}")

    def put(self, key: K, value: V) -> None:
        self._pending[key] = value
        self._wake.set()

    def pending(self, key: K) -> bool:
        """Whether a value of ``key`` waits to be written (or is being written)."""
        return key in self._pending or key in self._in_flight

    async def flush(self, key: K | None = None) -> None:
        """Waits until what was put (for ``key``, or all of it) is written."""
        async with self._changed:
            if key is None:
                await self._changed.wait_for(lambda: not self._pending and not self._in_flight)
            else:
                await self._changed.wait_for(lambda: not self.pending(key))

    async def close(self, timeout_s: float) -> None:
        """Writes what is pending, for at most ``timeout_s``, then stops the writer."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.flush()
        except TimeoutError:
            lost = {**self._pending, **self._in_flight}
            log.error(
                "records not written before shutdown",
                writer=self._name,
                count=len(lost),
                keys=[str(key) for key in lost][:100],
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            keys = list(self._pending)[: self._max_batch]
            self._in_flight = {key: self._pending.pop(key) for key in keys}
            try:
                await self._write(list(self._in_flight.values()))
            except Exception:
                log.exception(
                    "write failed; retrying", writer=self._name, count=len(self._in_flight)
                )
                for key, value in self._in_flight.items():
                    self._pending.setdefault(key, value)
                self._in_flight = {}
                await asyncio.sleep(self._retry_s)
                continue
            async with self._changed:
                self._in_flight = {}
                self._changed.notify_all()
