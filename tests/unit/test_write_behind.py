"""Writes behind the caller: coalesced per key, in order, retried, flushed on demand."""

from __future__ import annotations

import asyncio

from server.network.write_behind import WriteBehind


class Store:
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.failures = failures
        self.attempts = 0

    async def write(self, batch: list[tuple[str, int]]) -> None:
        self.attempts += 1
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database unreachable")
        self.batches.append(batch)


async def test_values_put_before_a_write_are_coalesced_into_the_newest() -> None:
    store = Store()
    writer: WriteBehind[str, tuple[str, int]] = WriteBehind("test", store.write)
    writer.start()
    writer.put("a", ("a", 1))
    writer.put("b", ("b", 1))
    writer.put("a", ("a", 2))
    await writer.flush()
    assert store.batches == [[("a", 2), ("b", 1)]]
    await writer.close(1.0)


async def test_a_failed_batch_is_retried_and_a_newer_value_wins() -> None:
    store = Store(failures=1)
    writer: WriteBehind[str, tuple[str, int]] = WriteBehind("test", store.write, retry_s=0.01)
    writer.start()
    writer.put("a", ("a", 1))
    writer.put("b", ("b", 1))
    while store.attempts == 0:  # noqa: ASYNC110 - waits for the writer's first attempt
        await asyncio.sleep(0)
    writer.put("a", ("a", 2))
    await writer.flush()
    # Nothing is lost, and the older value of "a" is never written after the newer one.
    written = [value for batch in store.batches for value in batch]
    assert sorted(written) == [("a", 2), ("b", 1)]
    await writer.close(1.0)


async def test_flush_of_a_key_waits_for_that_key_only() -> None:
    release = asyncio.Event()
    written: list[tuple[str, int]] = []

    async def slow(batch: list[tuple[str, int]]) -> None:
        if ("slow", 1) in batch:
            await release.wait()
        written.extend(batch)

    writer: WriteBehind[str, tuple[str, int]] = WriteBehind("test", slow, max_batch=1)
    writer.start()
    writer.put("slow", ("slow", 1))
    writer.put("quick", ("quick", 1))
    flushed = asyncio.create_task(writer.flush("quick"))
    await asyncio.sleep(0.01)
    assert not flushed.done()  # queued behind the slow batch
    release.set()
    await flushed
    assert written == [("slow", 1), ("quick", 1)]
    await writer.close(1.0)


async def test_close_writes_what_is_pending() -> None:
    store = Store()
    writer: WriteBehind[str, tuple[str, int]] = WriteBehind("test", store.write)
    writer.start()
    writer.put("last", ("last", 1))
    await writer.close(1.0)
    assert store.batches == [[("last", 1)]]


async def test_close_gives_up_after_its_timeout_when_the_store_is_down() -> None:
    store = Store(failures=10**6)
    writer: WriteBehind[str, tuple[str, int]] = WriteBehind("test", store.write, retry_s=0.01)
    writer.start()
    writer.put("stuck", ("stuck", 1))
    await writer.close(0.05)
    assert store.batches == []
    assert store.attempts >= 1
