"""Operator earnings: a projection of contribution events into totals per operator
and epoch, and reading them.

The projection is a consumer of the ledger's events: it counts each event id
once, so a redelivered event changes nothing. It lags the ledger by the relay's
delay; the contribution records themselves stay the system of record.
"""

from __future__ import annotations

from typing import Protocol
from uuid import UUID

import structlog

from core.errors import InvalidArgument
from core.ids import parse_id
from server.account.authz import Principal
from server.account.contributions import DEFAULT_TOTAL_EPOCHS, MAX_TOTAL_EPOCHS
from server.account.ledger import ContributionTotal
from server.account.ledger_events import CONTRIBUTION_RECORDED, LedgerEvent

log = structlog.get_logger(__name__)

# The durable name of the projection's subscription (its queue on RabbitMQ is
# ``AmqpNames.ledger_queue`` of it).
CONSUMER = "operator-earnings"


class EarningsStore(Protocol):
    async def add_contribution(
        self, event_id: UUID, operator_id: UUID, epoch: int, tokens: int, amount: int
    ) -> bool:
        """Adds one job to the operator's epoch unless the event was counted before;
        whether it counted now."""
        ...

    async def earnings(self, operator_id: UUID, epochs: int) -> list[ContributionTotal]: ...


class OperatorEarnings:
    def __init__(self, store: EarningsStore) -> None:
        self._store = store

    async def project(self, event: LedgerEvent) -> None:
        """Counts a ``contribution.recorded`` event; a malformed one is refused."""
        if event.kind != CONTRIBUTION_RECORDED:
            raise InvalidArgument(f"not a contribution event: {event.kind}")
        payload = event.payload
        try:
            operator = UUID(str(payload["operator_account_id"]))
            epoch, tokens, amount = (
                _integer(payload[name]) for name in ("epoch", "tokens", "amount")
            )
        except (KeyError, ValueError) as error:
            raise InvalidArgument(
                f"malformed contribution event {event.event_id}: {error}"
            ) from None
        counted = await self._store.add_contribution(
            event.event_id, operator, epoch, tokens, amount
        )
        if not counted:
            log.debug("contribution event seen before", event_id=str(event.event_id))

    async def operator_earnings(
        self, caller: Principal, operator_account_id: str, epochs: int
    ) -> list[ContributionTotal]:
        """The operator's projected earnings per epoch, newest first."""
        owner = parse_id(operator_account_id, field="operator_account_id")
        caller.require_access(owner)
        if not 0 <= epochs <= MAX_TOTAL_EPOCHS:
            raise InvalidArgument(f"epochs must be 0 to {MAX_TOTAL_EPOCHS}", field="epochs")
        return await self._store.earnings(owner, epochs or DEFAULT_TOTAL_EPOCHS)


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
