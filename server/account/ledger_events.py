"""Events out of the ledger, and the bus that carries them to their consumers.

Events are written to the outbox in the transaction of what they report and
relayed afterwards (``outbox_relay.py``), so an event exists exactly when its
change was committed; delivery is at least once, so a consumer counts each
event id once. Kinds: ``usage.settled`` (a hold settled: account, held,
captured, tokens) and ``contribution.recorded`` (an operator's contribution
record: operator, node, model, tokens, amount, epoch).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

USAGE_SETTLED = "usage.settled"
CONTRIBUTION_RECORDED = "contribution.recorded"


@dataclass(frozen=True, slots=True)
class LedgerEvent:
    event_id: UUID
    kind: str
    payload: Mapping[str, object]
    created_at: datetime


# Handles one event: returns once its effect is committed; a refusal (DomainError)
# marks an event it can never handle, anything else one to deliver again.
EventHandler = Callable[[LedgerEvent], Awaitable[None]]


class LedgerEventBus(Protocol):
    async def publish(self, events: Sequence[LedgerEvent]) -> None:
        """Returns once every event is delivered durably (or handled, in-process)."""
        ...

    async def subscribe(self, kind: str, consumer: str, handler: EventHandler) -> None:
        """Delivers events of ``kind`` to ``handler`` under the durable name ``consumer``."""
        ...

    async def close(self) -> None: ...


class InProcessLedgerEvents:
    """The bus without a broker: publishing hands each event to its handlers and
    returns when they are done, so a failing handler fails the relay's batch, which
    is relayed again later (handlers count each event once). The events of a batch
    are handled side by side, as a broker's consumer takes several at once, so a
    handler can commit them together."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[EventHandler]] = defaultdict(list)

    async def publish(self, events: Sequence[LedgerEvent]) -> None:
        outcomes = await asyncio.gather(
            *(handler(event) for event in events for handler in self._handlers[event.kind]),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def subscribe(self, kind: str, consumer: str, handler: EventHandler) -> None:
        self._handlers[kind].append(handler)

    async def close(self) -> None:
        self._handlers.clear()
