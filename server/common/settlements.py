"""A settlement of a ledger hold, and the durable queue that carries one to the ledger
when the account layer cannot be reached.

Cloud settles a hold directly; when the account layer is unreachable it
publishes the same settlement (exactly what ``SettleHold`` takes) to a
``SettlementQueue``, and the account layer applies it from there. Applying one
twice is harmless: the ledger resolves a hold once, and a second settlement
with the same parameters is a replay of the first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from core.errors import DomainError, ErrorReason


@dataclass(frozen=True, slots=True)
class OperatorLine:
    """Tokens a node operator's nodes delivered for one request."""

    operator_account_id: str
    node_id: str
    model: str
    tokens: int


@dataclass(frozen=True, slots=True)
class OperatorShares:
    """The operator lines of a settlement, and every token its capture pays for
    (lines claim part of them; the platform earns the operators' share of the rest)."""

    lines: tuple[OperatorLine, ...] = ()
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Settlement:
    """Capture ``capture`` of the hold, release the rest, credit ``shares``.

    Whoever ran the request sends it: a cloud replica when the request ends,
    or later whoever settles from a job record; the message is the same.
    """

    hold_id: str
    capture: int
    shares: OperatorShares = OperatorShares()

    @property
    def idempotency_key(self) -> str:
        """Names the settlement: a hold resolves once, so its id is the key."""
        return f"settle:{self.hold_id}"

    def fields(self) -> dict[str, object]:
        """Everything needed to apply the settlement by hand, for a log line."""
        return {
            "hold_id": self.hold_id,
            "capture": self.capture,
            "total_tokens": self.shares.total_tokens,
            "lines": [
                (line.operator_account_id, line.node_id, line.model, line.tokens)
                for line in self.shares.lines
            ],
        }


class LedgerUnavailable(Exception):
    """The account layer did not answer (down, or past the deadline): the settlement
    may or may not have been applied, and may be sent again."""


class QueueUnavailable(Exception):
    """The queue did not take the message durably (broker down or refusing)."""


# Applies a settlement: returns once it is committed; raises a refusal (a DomainError,
# see ``is_refusal``) for a settlement the ledger will never take, anything else for
# one to try again later.
SettlementHandler = Callable[[Settlement], Awaitable[None]]


def is_refusal(error: BaseException) -> bool:
    """Whether the ledger refused for good (bad or conflicting settlement), as opposed
    to failing now (unreachable, database down, internal error)."""
    return isinstance(error, DomainError) and error.reason is not ErrorReason.INTERNAL


class SettlementQueue(Protocol):
    async def publish(self, settlement: Settlement) -> None:
        """Returns once the queue holds ``settlement`` durably; else QueueUnavailable."""
        ...

    async def consume(self, handler: SettlementHandler) -> None:
        """Delivers queued settlements to ``handler`` in the background until ``close``:
        removed once it returns, delivered again after a failure, moved to the dead
        letters (with a log line) when refused."""
        ...

    async def pending(self) -> int:
        """Settlements waiting to be applied (0 when there are none to wait for)."""
        ...

    async def close(self) -> None: ...
