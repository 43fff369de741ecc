"""Ledger events: written to the outbox in the settlement's transaction, relayed
once (several relays side by side), projected into operator earnings once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from core.errors import NotFound
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.earnings import OperatorEarnings
from server.account.earnings_store import PostgresEarningsStore
from server.account.ledger import ContributionTotal, SettlementLine
from server.account.ledger_events import (
    CONTRIBUTION_RECORDED,
    USAGE_SETTLED,
    InProcessLedgerEvents,
    LedgerEvent,
)
from server.account.outbox_relay import OutboxRelay
from server.account.outbox_store import PostgresOutboxStore
from server.common.database import create_pool
from server.secrets import PlatformSecrets

ADMIN = Principal.service()
BROKER_DOWN = "amqp://guest:guest@127.0.0.1:1/"


@pytest.fixture(scope="module")
async def component(postgres_dsn: str) -> AsyncIterator[AccountComponent]:
    """An account server whose message broker is down: its own relay publishes
    nothing, so these tests relay by hand."""
    component = await AccountComponent.start(
        postgres_dsn, PlatformSecrets.generate(), hold_sweep_interval_s=3600, amqp_url=BROKER_DOWN
    )
    yield component
    await component.stop()


@pytest.fixture(scope="module")
async def db(postgres_dsn: str, component: AccountComponent) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


async def _settle(component: AccountComponent) -> tuple[str, str]:
    """Settles 3,000 of a 5,000 hold, all tokens on one operator; (hold, operator)."""
    consumer = await component.service.create_account(ADMIN, "consumer")
    operator = await component.service.create_account(ADMIN, "operator")
    await component.billing.top_up(ADMIN, str(consumer.account_id), 10_000, uuid.uuid4().hex)
    hold = await component.billing.create_hold(
        ADMIN, str(consumer.account_id), 5_000, uuid.uuid4().hex, None
    )
    line = SettlementLine(operator.account_id, "node-1", "m", 100)
    await component.billing.settle_hold(ADMIN, str(hold.hold_id), 3_000, [line], 100)
    return str(hold.hold_id), str(operator.account_id)


async def _events_of(db: Any, hold_id: str) -> list[Any]:
    return list(
        await db.fetch(
            """SELECT id, kind, payload::jsonb AS payload, published_at FROM ledger_outbox
               WHERE payload->>'hold_id' = $1 ORDER BY kind""",
            hold_id,
        )
    )


async def test_a_settlement_writes_its_events_in_its_transaction(
    component: AccountComponent, db: Any
) -> None:
    hold_id, operator = await _settle(component)
    events = await _events_of(db, hold_id)
    assert [e["kind"] for e in events] == [CONTRIBUTION_RECORDED, USAGE_SETTLED]
    contribution = await db.fetchrow(
        "SELECT * FROM contributions WHERE hold_id = $1", uuid.UUID(hold_id)
    )
    recorded, settled = (json.loads(e["payload"]) for e in events)
    assert recorded["contribution_id"] == str(contribution["id"])
    assert (recorded["operator_account_id"], recorded["amount"]) == (operator, 2_400)
    assert (settled["held"], settled["captured"], settled["status"]) == (5_000, 3_000, "settled")

    # A settlement the ledger refuses commits nothing, events included.
    consumer = await component.service.create_account(ADMIN, "consumer")
    await component.billing.top_up(ADMIN, str(consumer.account_id), 100, uuid.uuid4().hex)
    hold = await component.billing.create_hold(
        ADMIN, str(consumer.account_id), 100, uuid.uuid4().hex, None
    )
    unknown = SettlementLine(uuid.uuid4(), "node-1", "m", 1)
    with pytest.raises(NotFound):
        await component.billing.settle_hold(ADMIN, str(hold.hold_id), 100, [unknown], 1)
    assert await _events_of(db, str(hold.hold_id)) == []


async def test_events_are_relayed_once_and_projected_into_earnings(
    component: AccountComponent, postgres_dsn: str, db: Any
) -> None:
    hold_id, operator = await _settle(component)
    await _settle_again_for(component, operator)
    bus = InProcessLedgerEvents()
    await bus.subscribe(CONTRIBUTION_RECORDED, "earnings", component.earnings.project)
    pool = await create_pool(postgres_dsn, max_size=2)
    try:
        relay = OutboxRelay(PostgresOutboxStore(pool), bus, batch_size=3)
        while await relay.relay_once():
            pass
        assert all(e["published_at"] is not None for e in await _events_of(db, hold_id))
        assert await relay.relay_once() == 0  # each event relayed once
    finally:
        await pool.close()
    earnings = await component.earnings.operator_earnings(ADMIN, operator, 0)
    assert earnings == [ContributionTotal(earnings[0].epoch, 2, 200, 4_800)]


async def _settle_again_for(component: AccountComponent, operator: str) -> None:
    consumer = await component.service.create_account(ADMIN, "consumer")
    await component.billing.top_up(ADMIN, str(consumer.account_id), 10_000, uuid.uuid4().hex)
    hold = await component.billing.create_hold(
        ADMIN, str(consumer.account_id), 5_000, uuid.uuid4().hex, None
    )
    line = SettlementLine(uuid.UUID(operator), "node-2", "m", 100)
    await component.billing.settle_hold(ADMIN, str(hold.hold_id), 3_000, [line], 100)


async def test_the_projection_counts_a_redelivered_event_once(
    component: AccountComponent, postgres_dsn: str
) -> None:
    pool = await create_pool(postgres_dsn, max_size=2)
    try:
        earnings = OperatorEarnings(PostgresEarningsStore(pool))
        operator = str(uuid.uuid4())
        event = LedgerEvent(
            uuid.uuid4(),
            CONTRIBUTION_RECORDED,
            {"operator_account_id": operator, "epoch": 7, "tokens": 10, "amount": 80},
            datetime.now(UTC),
        )
        await asyncio.gather(*(earnings.project(event) for _ in range(5)))
        await earnings.project(event)
        assert await earnings.operator_earnings(ADMIN, operator, 0) == [
            ContributionTotal(7, 1, 10, 80)
        ]
    finally:
        await pool.close()


class _RecordingBus:
    def __init__(self) -> None:
        self.published: list[uuid.UUID] = []

    async def publish(self, events: Sequence[LedgerEvent]) -> None:
        await asyncio.sleep(0.05)  # holds the batch's row locks a while
        self.published.extend(e.event_id for e in events)

    async def subscribe(self, kind: str, consumer: str, handler: Any) -> None:
        raise AssertionError("not subscribed in these tests")

    async def close(self) -> None:
        pass


async def test_the_outbox_waits_out_a_broker_outage_and_relays_side_by_side_once(
    component: AccountComponent, postgres_dsn: str, db: Any
) -> None:
    for _ in range(4):
        hold_id, _ = await _settle(component)
    # The component's relay has been failing against the broker all along.
    await asyncio.sleep(0.5)
    assert all(e["published_at"] is None for e in await _events_of(db, hold_id))

    pool = await create_pool(postgres_dsn, max_size=4)
    try:
        buses = [_RecordingBus(), _RecordingBus()]
        relays = [OutboxRelay(PostgresOutboxStore(pool), bus, batch_size=2) for bus in buses]

        async def drain(relay: OutboxRelay) -> None:
            while await relay.relay_once():
                pass

        await asyncio.gather(*(drain(relay) for relay in relays))
    finally:
        await pool.close()
    published = buses[0].published + buses[1].published
    assert buses[0].published  # both took batches
    assert buses[1].published
    assert len(published) == len(set(published))  # none twice
    assert await db.fetchval("SELECT count(*) FROM ledger_outbox WHERE published_at IS NULL") == 0
