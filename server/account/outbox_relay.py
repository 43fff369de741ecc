"""The outbox relay: moves committed ledger events to the event bus.

Each batch is published and marked published in one transaction, so an event
is relayed at least once (a crash after publishing and before the commit
relays it again; consumers count each event id once). When the bus is down the
outbox accumulates and is relayed, in order, once it is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from server.account.ledger_events import LedgerEvent, LedgerEventBus

log = structlog.get_logger(__name__)


class OutboxStore(Protocol):
    async def relay_batch(
        self, limit: int, publish: Callable[[Sequence[LedgerEvent]], Awaitable[None]]
    ) -> int: ...


class OutboxRelay:
    def __init__(
        self,
        outbox: OutboxStore,
        bus: LedgerEventBus,
        *,
        batch_size: int = 100,
        idle_s: float = 0.5,
        max_retry_s: float = 10.0,
    ) -> None:
        self._outbox = outbox
        self._bus = bus
        self._batch_size = batch_size
        self._idle_s = idle_s
        self._max_retry_s = max_retry_s

    async def relay_once(self) -> int:
        """Relays one batch; returns how many events it held."""
        return await self._outbox.relay_batch(self._batch_size, self._bus.publish)

    async def run(self) -> None:
        """Relays until cancelled, backing off while the bus or the database fails."""
        delay = self._idle_s
        while True:
            try:
                relayed = await self.relay_once()
            except Exception as error:
                log.warning(
                    "relaying ledger events failed; retrying", error=str(error), retry_s=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_s)
                continue
            delay = self._idle_s
            if relayed < self._batch_size:
                await asyncio.sleep(self._idle_s)
