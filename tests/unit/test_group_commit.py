"""The batcher behind the ledger's group commit: who runs alone, who shares a batch,
and what each caller gets back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from server.common.batcher import Batcher


@dataclass
class Operation:
    """Doubles each number; batches and lone runs are recorded, and the first
    run waits for ``gate`` so that others queue behind it."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    running: asyncio.Event = field(default_factory=asyncio.Event)
    batches: list[list[int]] = field(default_factory=list)
    alone: list[int] = field(default_factory=list)
    fail_batches: bool = False

    async def one(self, item: int) -> int:
        self.alone.append(item)
        self.running.set()
        await self.gate.wait()
        if item < 0:
            raise ValueError(f"negative: {item}")
        return item * 2

    async def many(self, items: Sequence[int]) -> list[int | BaseException | None]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_batches:
            raise ConnectionError("the database went away")
        # Odd numbers are left to the single path; 13 is refused in the batch.
        return [
            ValueError("unlucky") if item == 13 else None if item % 2 else item * 2
            for item in items
        ]


def batcher(operation: Operation, *, max_size: int = 64) -> Batcher[int, int]:
    return Batcher(
        operation.one,
        operation.many,
        key=lambda item: abs(item),
        max_size=max_size,
        max_in_flight=1,
    )


async def test_a_lone_call_runs_alone_at_once() -> None:
    operation = Operation()
    operation.gate.set()
    assert await batcher(operation).submit(21) == 42
    assert (operation.alone, operation.batches) == ([21], [])


async def test_calls_made_together_share_one_batch() -> None:
    operation = Operation()
    operation.gate.set()
    calls = batcher(operation)
    assert await asyncio.gather(*(calls.submit(n) for n in (2, 4, 6))) == [4, 8, 12]
    assert (operation.alone, operation.batches) == ([], [[2, 4, 6]])


async def test_calls_arriving_while_a_batch_runs_share_the_next_one() -> None:
    operation = Operation()
    calls = batcher(operation)
    first = asyncio.create_task(calls.submit(2))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(calls.submit(n)) for n in (4, 6, 8)]
    await operation.running.wait()  # the first runs; the others wait for it
    assert operation.batches == []
    operation.gate.set()
    assert await first == 4
    assert await asyncio.gather(*rest) == [8, 12, 16]
    assert operation.batches == [[4, 6, 8]]


async def test_each_item_gets_its_own_outcome() -> None:
    operation = Operation()
    calls = batcher(operation)
    blocker = asyncio.create_task(calls.submit(100))
    await asyncio.sleep(0)
    outcomes = asyncio.gather(*(calls.submit(n) for n in (4, 5, 13, -3)), return_exceptions=True)
    operation.gate.set()
    await blocker
    four, five, thirteen, minus_three = await outcomes
    assert (four, five) == (8, 10)  # 5 went to the single path
    assert isinstance(thirteen, ValueError)
    assert str(thirteen) == "unlucky"
    assert isinstance(minus_three, ValueError)
    assert str(minus_three) == "negative: -3"
    assert operation.batches == [[4, 5, 13, -3]]
    assert operation.alone == [100, 5, -3]


async def test_a_failed_batch_runs_each_item_alone() -> None:
    operation = Operation(fail_batches=True)
    calls = batcher(operation)
    blocker = asyncio.create_task(calls.submit(100))
    await asyncio.sleep(0)
    outcomes = asyncio.gather(*(calls.submit(n) for n in (2, -4, 6)), return_exceptions=True)
    operation.gate.set()
    await blocker
    two, minus_four, six = await outcomes
    assert (two, six) == (4, 12)
    assert isinstance(minus_four, ValueError)
    assert operation.alone == [100, 2, -4, 6]


async def test_one_key_is_never_in_two_places_at_once() -> None:
    operation = Operation()
    calls = batcher(operation)
    first = asyncio.create_task(calls.submit(2))
    await asyncio.sleep(0)
    # -2 and the second 2 have the first's key: they wait for it to finish, and
    # then take two batches.
    rest = asyncio.gather(*(calls.submit(n) for n in (-2, 4, 2)))
    await asyncio.sleep(0)
    operation.gate.set()
    assert await first == 4
    assert await rest == [-4, 8, 4]
    assert operation.batches == [[-2, 4]]
    assert operation.alone == [2, 2]


async def test_batches_are_bounded() -> None:
    operation = Operation()
    calls = batcher(operation, max_size=3)
    blocker = asyncio.create_task(calls.submit(100))
    await asyncio.sleep(0)
    outcomes = asyncio.gather(*(calls.submit(n) for n in range(2, 16, 2)))
    operation.gate.set()
    await blocker
    assert await outcomes == [n * 2 for n in range(2, 16, 2)]
    assert [len(batch) for batch in operation.batches] == [3, 3]
    assert operation.alone == [100, 14]


async def test_a_caller_gone_before_its_batch_began_is_not_run() -> None:
    operation = Operation()
    calls = batcher(operation)
    blocker = asyncio.create_task(calls.submit(100))
    await asyncio.sleep(0)
    left = asyncio.create_task(calls.submit(2))
    stays = asyncio.create_task(calls.submit(4))
    await asyncio.sleep(0)
    left.cancel()
    operation.gate.set()
    await blocker
    assert await stays == 8
    with pytest.raises(asyncio.CancelledError):
        await left
    assert 2 not in operation.alone + [n for batch in operation.batches for n in batch]
