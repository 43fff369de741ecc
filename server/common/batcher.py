"""Group commit: concurrent calls of one operation run together, as batches.

Each caller submits its item and awaits its own outcome. A batch starts as soon
as the event loop has run what was ready with the first item (calls made
together, say by callers a finished batch just woke, share it) while fewer
than ``max_in_flight`` batches run; otherwise items wait, and the next batch
takes every waiting item (up to ``max_size``). A lone call thus runs alone and
without delay, while under load one batch (one transaction, one commit)
carries many calls: the cost per call falls as the load rises, instead of
calls queueing one by one on the same rows.

A batch of one item runs ``run_one``; a larger one ``run_many``, which gives
each item its outcome: a result, an exception, or None for an item to run
alone after the batch (say, a case only the single path handles). When
``run_many`` raises, every item of the batch runs alone, so that whatever
failed it is the outcome of the items it concerns only.

Items with the same key never share a batch nor run in two batches at once
(an idempotency key, a hold id): the later one waits for the next batch, and
sees what the first one committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar, cast

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")  # never None: None is what run_many gives an item to run alone


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_one: Callable[[T], Awaitable[R]],
        run_many: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException | None]]],
        *,
        key: Callable[[T], Hashable],
        max_size: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        if max_size < 1 or max_in_flight < 1:
            raise ValueError("a batcher needs max_size and max_in_flight of at least 1")
        self._run_one = run_one
        self._run_many = run_many
        self._key = key
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._busy_keys: set[Hashable] = set()
        self._in_flight = 0
        # The event loop a start is scheduled on, if any (one that closed first
        # leaves it set: the next call schedules again on its own loop).
        self._start_scheduled_on: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done

    async def submit(self, item: T) -> R:
        """The item's outcome, once the batch that carried it has run."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._start_scheduled_on is not loop:
            self._start_scheduled_on = loop
            loop.call_soon(self._start_batches)
        return await future

    def _start_batches(self) -> None:
        self._start_scheduled_on = None
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = self._take()
            if not batch:
                return  # only items whose key is busy: they wait for it
            self._in_flight += 1
            task = asyncio.create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        waiting: list[tuple[T, asyncio.Future[R]]] = []
        for item, future in self._waiting:
            if future.cancelled():
                continue  # its caller left before the batch began: nothing was done
            key = self._key(item)
            if len(batch) < self._max_size and key not in self._busy_keys:
                self._busy_keys.add(key)
                batch.append((item, future))
            else:
                waiting.append((item, future))
        self._waiting = waiting
        return batch

    async def _execute(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        outcomes: Sequence[R | BaseException]
        try:
            outcomes = await self._outcomes(items)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            outcomes = [error] * len(items)
        finally:
            for item in items:
                self._busy_keys.discard(self._key(item))
            self._in_flight -= 1
            self._start_batches()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # its caller was cancelled meanwhile
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _outcomes(self, items: list[T]) -> list[R | BaseException]:
        together: Sequence[R | BaseException | None] = [None] * len(items)
        if len(items) > 1:
            try:
                together = await self._run_many(items)
                if len(together) != len(items):
                    raise RuntimeError(f"a batch of {len(items)} gave {len(together)} outcomes")
            except Exception as error:
                log.warning(
                    "batch failed, its items run alone", items=len(items), error=repr(error)
                )
                together = [None] * len(items)
        alone = [i for i, outcome in enumerate(together) if outcome is None]
        if len(alone) == 1:  # most often a lone call: no need to gather
            results: list[R | BaseException] = [await self._alone(items[alone[0]])]
        else:
            results = await asyncio.gather(
                *(self._run_one(items[i]) for i in alone), return_exceptions=True
            )
        outcomes = list(together)
        for i, result in zip(alone, results, strict=True):
            outcomes[i] = result
        return cast(list[R | BaseException], outcomes)  # no None is left

    async def _alone(self, item: T) -> R | BaseException:
        try:
            return await self._run_one(item)
        except Exception as error:
            return error
