"""The bridge from a backend's worker thread to the agent's event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

from agent.runtime.base import Finished, GenerationError, GenerationEvent, TokenText, Waiting
from core.inference import TokenLogprob


class GenerationChannel:
    """Hands a worker thread's output to the event loop.

    Text and token counts that arrive before the consumer reads are merged, and
    the loop is woken once per batch rather than once per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.cancel = threading.Event()
        self._loop = loop
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._texts: list[str] = []
        self._count = 0
        self._ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._end: Finished | BaseException | None = None
        self._waiting: Waiting | None = None
        self._wake_pending = False

    def put(
        self, text: str, count: int, token: int | None = None, logprob: TokenLogprob | None = None
    ) -> None:
        if not text and not count:
            return
        with self._lock:
            if text:
                self._texts.append(text)
            self._count += count
            if token is not None:
                self._ids.append(token)
            if logprob is not None:
                self._logprobs.append(logprob)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._wake()

    def wait(self, waiting: Waiting) -> None:
        """The generation waits on the scheduler (reported once per read)."""
        with self._lock:
            self._waiting = waiting
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._wake()

    def end(self, outcome: Finished | BaseException) -> None:
        with self._lock:
            self._end = outcome
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel.set()
            raise

    async def events(self) -> AsyncGenerator[GenerationEvent, None]:
        uncarried = 0  # counted tokens not yet attached to an event
        ids: list[int] = []  # and their ids
        logprobs: list[TokenLogprob] = []  # and their logprobs, if asked for
        while True:
            await self._ready.wait()
            with self._lock:
                self._ready.clear()
                self._wake_pending = False
                text = "".join(self._texts)
                self._texts.clear()
                uncarried += self._count
                self._count = 0
                ids.extend(self._ids)
                self._ids.clear()
                logprobs.extend(self._logprobs)
                self._logprobs.clear()
                end = self._end
                waiting, self._waiting = self._waiting, None
            if text:
                yield TokenText(text, uncarried, tuple(ids), tuple(logprobs))
                uncarried = 0
                ids = []
                logprobs = []
            if waiting is not None and end is None:
                yield waiting
            if isinstance(end, GenerationError):
                raise end
            if isinstance(end, BaseException):
                raise GenerationError(f"generation failed: {end!r}") from end
            if end is not None:
                if uncarried:
                    yield TokenText("", uncarried, tuple(ids), tuple(logprobs))
                yield end
                return
