"""The in-process settlement queue: what stands in for RabbitMQ on one machine.

Settlements wait in memory and are handed to the consumer one at a time, in
order; a failed one is retried after a backoff (capped, so a ledger that comes
back is caught up within ``max_retry_s``) until the ledger takes or refuses
it. Memory is not durable: what this queue holds is lost with the process, in
which case the holds expire and are released as they would without a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog

from server.common.settlements import Settlement, SettlementHandler, is_refusal

log = structlog.get_logger(__name__)


class InProcessSettlementQueue:
    def __init__(self, *, first_retry_s: float = 0.2, max_retry_s: float = 5.0) -> None:
        self._waiting: deque[Settlement] = deque()
        self._arrived = asyncio.Event()
        self._first_retry_s = first_retry_s
        self._max_retry_s = max_retry_s
        self._consumer: asyncio.Task[None] | None = None
        # Refused settlements, kept (and logged) so that none is lost unseen.
        self.dead_letters: list[Settlement] = []

    async def publish(self, settlement: Settlement) -> None:
        self._waiting.append(settlement)
        self._arrived.set()

    async def consume(self, handler: SettlementHandler) -> None:
        if self._consumer is not None:
            raise RuntimeError("the queue already has a consumer")
        self._consumer = asyncio.create_task(self._deliver(handler), name="settlement-queue")

    async def pending(self) -> int:
        return len(self._waiting)

    async def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        for settlement in self._waiting:
            log.error("settlement not applied before shutdown", **settlement.fields())

    async def _deliver(self, handler: SettlementHandler) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            # The head stays queued until applied: cancelled meanwhile, it is still
            # there for ``close`` to report.
            await self._apply(handler, self._waiting[0])
            self._waiting.popleft()

    async def _apply(self, handler: SettlementHandler, settlement: Settlement) -> None:
        delay = self._first_retry_s
        while True:
            try:
                await handler(settlement)
                return
            except Exception as error:
                if is_refusal(error):
                    self.dead_letters.append(settlement)
                    log.error("settlement refused", error=str(error), **settlement.fields())
                    return
                log.warning(
                    "settlement failed; retrying",
                    error=str(error),
                    retry_s=delay,
                    hold_id=settlement.hold_id,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_s)
