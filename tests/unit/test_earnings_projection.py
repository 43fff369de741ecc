"""The earnings projection refuses events it can never count (they are
dead-lettered, not retried forever) and counts well-formed ones."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from core.errors import InvalidArgument
from server.account.earnings import OperatorEarnings
from server.account.ledger import ContributionTotal
from server.account.ledger_events import CONTRIBUTION_RECORDED, USAGE_SETTLED, LedgerEvent


class _Store:
    def __init__(self) -> None:
        self.added: list[tuple[uuid.UUID, uuid.UUID, int, int, int]] = []

    async def add_contribution(
        self, event_id: uuid.UUID, operator_id: uuid.UUID, epoch: int, tokens: int, amount: int
    ) -> bool:
        self.added.append((event_id, operator_id, epoch, tokens, amount))
        return True

    async def earnings(self, operator_id: uuid.UUID, epochs: int) -> list[ContributionTotal]:
        raise AssertionError("not read here")


def _event(kind: str, **payload: object) -> LedgerEvent:
    return LedgerEvent(uuid.uuid4(), kind, payload, datetime.now(UTC))


async def test_a_contribution_event_is_counted() -> None:
    store = _Store()
    operator = uuid.uuid4()
    event = _event(
        CONTRIBUTION_RECORDED, operator_account_id=str(operator), epoch=3, tokens=10, amount=80
    )
    await OperatorEarnings(store).project(event)
    assert store.added == [(event.event_id, operator, 3, 10, 80)]


@pytest.mark.parametrize(
    "event",
    [
        _event(USAGE_SETTLED, hold_id="h"),
        _event(CONTRIBUTION_RECORDED, epoch=3, tokens=10, amount=80),
        _event(CONTRIBUTION_RECORDED, operator_account_id="x", epoch=3, tokens=10, amount=80),
        _event(
            CONTRIBUTION_RECORDED,
            operator_account_id=str(uuid.uuid4()),
            epoch=3,
            tokens="10",
            amount=80,
        ),
    ],
)
async def test_a_malformed_event_is_refused(event: LedgerEvent) -> None:
    store = _Store()
    with pytest.raises(InvalidArgument):
        await OperatorEarnings(store).project(event)
    assert store.added == []
