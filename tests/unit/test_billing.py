"""BillingService's holds and settlements against an in-memory ledger: what reaches the
store, how a capture is split, replays and refusals, expiry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import cast
from uuid import UUID

import pytest

from core.errors import (
    DomainError,
    HoldAlreadyResolved,
    IdempotencyKeyReused,
    InsufficientQuota,
    InvalidArgument,
    PermissionDenied,
)
from server.account.authz import Principal
from server.account.billing import BillingService, LedgerStore
from server.account.ledger import Hold, HoldStatus, SettlementLine
from tests.doubles.account_stores import InMemoryLedger

SERVICE = Principal.service()
CREDITS = 10_000
START = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> InMemoryLedger:
    return InMemoryLedger(clock)


@pytest.fixture
def billing(ledger: InMemoryLedger, clock: Clock) -> BillingService:
    # Holds only use the LedgerStore's balances and top-ups, which the fake implements.
    return BillingService(cast(LedgerStore, ledger), ledger, clock=clock)


@pytest.fixture
async def customer(billing: BillingService, ledger: InMemoryLedger) -> UUID:
    account_id = uuid.uuid4()
    ledger.open_account(account_id)
    await billing.top_up(SERVICE, str(account_id), CREDITS, "top-up-1")
    return account_id


def _operator(ledger: InMemoryLedger) -> UUID:
    account_id = uuid.uuid4()
    ledger.open_account(account_id)
    return account_id


async def _hold(billing: BillingService, customer: UUID, amount: int = 1_000) -> Hold:
    return await billing.create_hold(SERVICE, str(customer), amount, uuid.uuid4().hex, None)


async def test_a_settlement_captures_splits_by_tokens_and_releases_the_rest(
    billing: BillingService, ledger: InMemoryLedger, customer: UUID
) -> None:
    first, second = _operator(ledger), _operator(ledger)
    hold = await _hold(billing, customer)
    lines = [SettlementLine(first, "node-1", "m", 30), SettlementLine(second, "node-2", "m", 10)]

    settled = await billing.settle_hold(SERVICE, str(hold.hold_id), 600, lines, total_tokens=50)

    assert (settled.status, settled.captured) == (HoldStatus.SETTLED, 600)
    # 80 % of 600 over 50 tokens: 288 and 96; the platform keeps the fee, the unclaimed
    # 10 tokens' share and the rounding.
    assert (ledger.earned[first], ledger.earned[second], ledger.platform_revenue) == (
        288,
        96,
        216,
    )
    assert (ledger.available[customer], ledger.held[customer]) == (CREDITS - 600, 0)


async def test_without_total_tokens_the_lines_share_every_token(
    billing: BillingService, ledger: InMemoryLedger, customer: UUID
) -> None:
    operator = _operator(ledger)
    hold = await _hold(billing, customer)

    await billing.settle_hold(
        SERVICE, str(hold.hold_id), 500, [SettlementLine(operator, "node-1", "m", 7)]
    )

    assert (ledger.earned[operator], ledger.platform_revenue) == (400, 100)


async def test_a_replayed_settlement_changes_nothing_and_a_different_one_is_refused(
    billing: BillingService, ledger: InMemoryLedger, customer: UUID
) -> None:
    operator = _operator(ledger)
    hold = await _hold(billing, customer)
    lines = [SettlementLine(operator, "node-1", "m", 10)]
    first = await billing.settle_hold(SERVICE, str(hold.hold_id), 300, lines)

    assert await billing.settle_hold(SERVICE, str(hold.hold_id), 300, lines) == first
    with pytest.raises(HoldAlreadyResolved):
        await billing.settle_hold(SERVICE, str(hold.hold_id), 200, lines)
    with pytest.raises(HoldAlreadyResolved):
        await billing.settle_hold(SERVICE, str(hold.hold_id), 300, [])

    assert (ledger.available[customer], ledger.earned[operator]) == (CREDITS - 300, 240)


async def test_capturing_nothing_releases_the_hold_and_credits_no_operator(
    billing: BillingService, ledger: InMemoryLedger, customer: UUID
) -> None:
    operator = _operator(ledger)
    hold = await _hold(billing, customer)

    released = await billing.settle_hold(
        SERVICE, str(hold.hold_id), 0, [SettlementLine(operator, "node-1", "m", 10)]
    )

    assert released.status is HoldStatus.RELEASED
    assert (ledger.available[customer], ledger.earned[operator]) == (CREDITS, 0)


@pytest.mark.parametrize(
    ("caller", "capture", "lines", "total_tokens", "refusal"),
    [
        (Principal(uuid.uuid4(), admin=False), 100, "one", 0, PermissionDenied),
        (SERVICE, -1, "one", 0, InvalidArgument),
        (SERVICE, 1_001, "one", 0, InvalidArgument),
        (SERVICE, 100, "same operator twice", 0, InvalidArgument),
        (SERVICE, 100, "one", 5, InvalidArgument),
    ],
)
async def test_a_refused_settlement_leaves_the_hold_open(
    caller: Principal,
    capture: int,
    lines: str,
    total_tokens: int,
    refusal: type[DomainError],
    billing: BillingService,
    ledger: InMemoryLedger,
    customer: UUID,
) -> None:
    operator = _operator(ledger)
    hold = await _hold(billing, customer)
    line = SettlementLine(operator, "node-1", "m", 10)

    with pytest.raises(refusal):
        await billing.settle_hold(
            caller,
            str(hold.hold_id),
            capture,
            [line] if lines == "one" else [line, line],
            total_tokens,
        )

    assert ledger.holds[hold.hold_id].status is HoldStatus.OPEN
    assert (ledger.available[customer], ledger.held[customer]) == (CREDITS - 1_000, 1_000)


async def test_a_hold_beyond_the_available_credits_is_refused(
    billing: BillingService, ledger: InMemoryLedger, customer: UUID
) -> None:
    with pytest.raises(InsufficientQuota):
        await _hold(billing, customer, CREDITS + 1)

    assert (ledger.available[customer], ledger.holds) == (CREDITS, {})


async def test_a_hold_replayed_with_a_recomputed_expiry_is_the_same_hold(
    billing: BillingService, ledger: InMemoryLedger, clock: Clock, customer: UUID
) -> None:
    account = str(customer)
    first = await billing.create_hold(
        SERVICE, account, 100, "hold-1", clock.now + timedelta(minutes=1)
    )
    again = await billing.create_hold(
        SERVICE, account, 100, "hold-1", clock.now + timedelta(minutes=2)
    )

    assert again == first
    assert ledger.available[customer] == CREDITS - 100
    with pytest.raises(IdempotencyKeyReused):
        await billing.create_hold(SERVICE, account, 200, "hold-1", None)


async def test_a_hold_s_expiry_defaults_to_the_ttl_and_is_bounded(
    billing: BillingService, clock: Clock, customer: UUID
) -> None:
    hold = await _hold(billing, customer)
    assert hold.expires_at == START + timedelta(minutes=10)

    for expires in (START, START + timedelta(days=1, seconds=1)):
        with pytest.raises(InvalidArgument) as refused:
            await billing.create_hold(SERVICE, str(customer), 100, uuid.uuid4().hex, expires)
        assert refused.value.metadata == {"field": "expires"}


async def test_expired_holds_are_released_in_batches(
    billing: BillingService, ledger: InMemoryLedger, clock: Clock, customer: UUID
) -> None:
    for _ in range(5):
        await _hold(billing, customer, 100)
    kept = await billing.create_hold(
        SERVICE, str(customer), 100, "long", START + timedelta(hours=1)
    )
    clock.now = START + timedelta(minutes=11)

    assert await billing.release_expired_holds(batch_size=2) == 5

    assert ledger.sweeps == [2, 2, 2]
    assert ledger.holds[kept.hold_id].status is HoldStatus.OPEN
    assert ledger.available[customer] == CREDITS - 100
