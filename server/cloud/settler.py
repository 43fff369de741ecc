"""Settling holds so that no settlement is lost to an unreachable ledger.

A settlement goes to the account layer directly. When the account layer does
not answer, it is published to the settlement queue, from which the account
layer applies it once it is back; when the queue is down too, it waits in this
process's memory and is retried (directly first, then the queue) until one of
them takes it. The ledger resolves a hold once and treats the same settlement
again as a replay, so sending a settlement twice (a deadline passed after the
ledger committed, or a message delivered twice) charges nobody twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog

from server.cloud.metrics import CloudMetrics
from server.common.settlements import (
    LedgerUnavailable,
    OperatorShares,
    QueueUnavailable,
    Settlement,
    SettlementQueue,
    is_refusal,
)

log = structlog.get_logger(__name__)


class LedgerPort(Protocol):
    async def settle_hold(self, hold_id: str, capture: int, shares: OperatorShares) -> int: ...


class Settler:
    def __init__(
        self,
        ledger: LedgerPort,
        queue: SettlementQueue,
        *,
        first_retry_s: float = 0.5,
        max_retry_s: float = 10.0,
        metrics: CloudMetrics | None = None,
    ) -> None:
        self._metrics = metrics or CloudMetrics()
        self._ledger = ledger
        self._queue = queue
        self._first_retry_s = first_retry_s
        self._max_retry_s = max_retry_s
        # Settlements neither the ledger nor the queue has taken yet.
        self._backlog: list[Settlement] = []
        self._flusher: asyncio.Task[None] | None = None

    async def settle(self, settlement: Settlement) -> int:
        """The captured amount: the ledger's answer, or, when the settlement is
        deferred, the capture it will apply (a settlement captures exactly that)."""
        metrics = self._metrics
        try:
            charged = await self._apply(settlement)
            metrics.settlements.inc("applied")
            return charged
        except LedgerUnavailable as error:
            metrics.settlement_failures.inc("ledger_unavailable")
            log.warning(
                "ledger unreachable; settlement deferred",
                error=str(error),
                hold_id=settlement.hold_id,
            )
        try:
            await self._queue.publish(settlement)
            metrics.settlements.inc("queued")
            log.info("settlement queued", hold_id=settlement.hold_id)
        except QueueUnavailable as error:
            metrics.settlement_failures.inc("queue_unavailable")
            metrics.settlements.inc("kept")
            log.error(
                "settlement queue unreachable; settlement kept in memory",
                error=str(error),
                hold_id=settlement.hold_id,
            )
            self._keep(settlement)
        return settlement.capture

    async def consume_queue(self) -> None:
        """Applies the queue's settlements through the ledger's API: for a queue in this
        process, which no other process can read."""
        await self._queue.consume(self._handle)

    def backlog(self) -> int:
        """Settlements waiting in this process's memory."""
        return len(self._backlog)

    async def close(self, grace_s: float = 10.0) -> None:
        """Gives the backlog ``grace_s`` to go out, then logs what could not (with what
        is needed to apply it by hand). The queue is its owner's to close."""
        flusher = self._flusher
        if flusher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(flusher), grace_s)
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        for settlement in self._backlog:
            log.error("settlement not applied before shutdown", **settlement.fields())

    async def _apply(self, settlement: Settlement) -> int:
        return await self._ledger.settle_hold(
            settlement.hold_id, settlement.capture, settlement.shares
        )

    async def _handle(self, settlement: Settlement) -> None:
        await self._apply(settlement)

    def _keep(self, settlement: Settlement) -> None:
        self._backlog.append(settlement)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="settlement-backlog")

    async def _flush(self) -> None:
        delay = self._first_retry_s
        try:
            while self._backlog:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_s)
                for settlement in list(self._backlog):
                    if await self._send(settlement):
                        self._backlog.remove(settlement)
        finally:
            self._flusher = None

    async def _send(self, settlement: Settlement) -> bool:
        """Whether the ledger or the queue took ``settlement`` (or the ledger refused it
        for good, which is logged)."""
        try:
            await self._apply(settlement)
            log.info("deferred settlement applied", hold_id=settlement.hold_id)
            return True
        except LedgerUnavailable:
            self._metrics.settlement_failures.inc("ledger_unavailable")
        except Exception as error:
            if not is_refusal(error):
                self._metrics.settlement_failures.inc("ledger_error")
                log.warning(
                    "deferred settlement failed; retrying",
                    error=str(error),
                    hold_id=settlement.hold_id,
                )
                return False
            self._metrics.settlement_failures.inc("refused")
            log.error("deferred settlement refused", error=str(error), **settlement.fields())
            return True
        try:
            await self._queue.publish(settlement)
            log.info("deferred settlement queued", hold_id=settlement.hold_id)
            return True
        except QueueUnavailable:
            self._metrics.settlement_failures.inc("queue_unavailable")
            return False
