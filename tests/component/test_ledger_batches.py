"""The ledger's group commit and sharded system accounts on the real PostgreSQL.

Holds, settlements and the projections of their events (operator earnings,
consumer usage) that arrive while others are being committed share one
transaction; each must still get exactly the
outcome it would get alone. The
system accounts are kept in shards, summed in every read, and a database
created before the shards existed upgrades keeping its totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from core.errors import HoldAlreadyResolved, InsufficientQuota, InvalidArgument, NotFound
from server.account import hold_settlement
from server.account.authz import Principal
from server.account.component import MIGRATIONS, AccountComponent
from server.account.earnings import OperatorEarnings
from server.account.earnings_store import PostgresEarningsStore
from server.account.hold_settlement import Settlement
from server.account.hold_store import PostgresHoldStore
from server.account.ledger import (
    ContributionTotal,
    Hold,
    HoldStatus,
    SettlementLine,
    request_fingerprint,
    settle_fingerprint,
)
from server.account.ledger_events import CONTRIBUTION_RECORDED, LedgerEvent
from server.account.ledger_sql import CASH_IN, CASH_OUT, PLATFORM_REVENUE, SHARDS
from server.account.ledger_store import PostgresLedgerStore
from server.account.usage import Interval, UsageRecord
from server.account.usage_store import PostgresUsageStore
from server.common.database import apply_migrations, create_pool, load_migrations
from server.secrets import PlatformSecrets
from tests.component.test_ledger_invariants import INVARIANTS, TOTALS_MATCH_TRANSFERS

ADMIN = Principal.service()
T = TypeVar("T")


@pytest.fixture(scope="module")
async def component(postgres_dsn: str) -> AsyncIterator[AccountComponent]:
    component = await AccountComponent.start(
        postgres_dsn, PlatformSecrets.generate(), hold_sweep_interval_s=3600
    )
    yield component
    await component.stop()


@pytest.fixture
async def db(postgres_dsn: str, component: AccountComponent) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def batches(
    postgres_dsn: str, component: AccountComponent, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[PostgresHoldStore, list[tuple[str, int]]]]:
    """A hold store whose batches run one at a time, and the batches it ran
    (kind, size): calls made while one runs form the next."""
    ran: list[tuple[str, int]] = []
    create_many, settle_many = PostgresHoldStore._create_many, PostgresHoldStore._settle_many

    async def holds(store: PostgresHoldStore, requests: Sequence[Any]) -> Any:
        ran.append(("holds", len(requests)))
        return await create_many(store, requests)

    async def settlements(store: PostgresHoldStore, requests: Sequence[Settlement]) -> Any:
        ran.append(("settlements", len(requests)))
        return await settle_many(store, requests)

    monkeypatch.setattr(PostgresHoldStore, "_create_many", holds)
    monkeypatch.setattr(PostgresHoldStore, "_settle_many", settlements)
    pool = await create_pool(postgres_dsn)
    yield PostgresHoldStore(pool, max_in_flight=1), ran
    await pool.close()


async def new_account(component: AccountComponent, funds: int = 0) -> uuid.UUID:
    account = (await component.service.create_account(ADMIN, "test")).account_id
    if funds:
        await component.billing.top_up(ADMIN, str(account), funds, uuid.uuid4().hex)
    return account


def hold(
    store: PostgresHoldStore, account: uuid.UUID, amount: int, key: str = ""
) -> Awaitable[Hold]:
    expires = datetime.now(UTC) + timedelta(minutes=5)
    fingerprint = request_fingerprint("hold", account, amount)
    return store.create_hold(account, amount, expires, key or uuid.uuid4().hex, fingerprint)


def settle(
    store: PostgresHoldStore, hold_id: uuid.UUID, capture: int, lines: Sequence[SettlementLine] = ()
) -> Awaitable[Hold]:
    tokens = sum(line.tokens for line in lines)
    fingerprint = settle_fingerprint(capture, lines, tokens)
    return store.settle_hold(hold_id, capture, lines, tokens, fingerprint)


async def behind_another(
    first: Callable[[], Awaitable[object]], calls: Sequence[Callable[[], Awaitable[T]]]
) -> list[T | BaseException]:
    """Runs ``calls`` while ``first`` is being committed, so that they form one batch."""
    running = asyncio.ensure_future(first())
    await asyncio.sleep(0)
    outcomes = await asyncio.gather(*(call() for call in calls), return_exceptions=True)
    await running
    return outcomes


async def available(component: AccountComponent, account: uuid.UUID) -> tuple[int, int]:
    balance = await component.billing.get_balance(ADMIN, str(account))
    return balance.available, balance.held


async def assert_invariants(db: Any) -> None:
    row = await db.fetchrow(INVARIANTS)
    assert dict(row) == {"posted_gap": 0, "pending_gap": 0, "overdrawn": 0, "negative_pending": 0}
    assert await db.fetchval(TOTALS_MATCH_TRANSFERS) == 0


async def test_a_batch_of_holds_grants_in_order_what_each_account_covers(
    component: AccountComponent, db: Any, batches: tuple[PostgresHoldStore, list[Any]]
) -> None:
    store, ran = batches
    rich = await new_account(component, 10_000)
    poor = await new_account(component, 5_000)
    other = await new_account(component, 1_000)
    first = await hold(store, poor, 1_000, key="first-" + poor.hex)
    refused_keys = [uuid.uuid4().hex for _ in range(2)]
    outcomes = await behind_another(
        lambda: hold(store, other, 1_000),
        [
            lambda: hold(store, rich, 6_000),
            lambda: hold(store, rich, 5_000, key=refused_keys[0]),  # 4,000 left
            lambda: hold(store, rich, 4_000),
            lambda: hold(store, poor, 1_000, key="first-" + poor.hex),  # a replay
            lambda: hold(store, uuid.uuid4(), 100),
            lambda: hold(store, poor, 5_000, key=refused_keys[1]),  # 4,000 left
        ],
    )
    assert ("holds", 6) in ran
    six, five, four, replay, unknown, too_much = outcomes
    assert isinstance(six, Hold)
    assert isinstance(four, Hold)
    assert (six.amount, six.status, four.amount) == (6_000, HoldStatus.OPEN, 4_000)
    assert isinstance(five, InsufficientQuota)
    assert isinstance(too_much, InsufficientQuota)
    assert replay == first
    assert isinstance(unknown, NotFound)
    assert await available(component, rich) == (0, 10_000)
    assert await available(component, poor) == (4_000, 1_000)
    refused = await db.fetchval(
        "SELECT count(*) FROM transfers WHERE idempotency_key = ANY($1::text[])", refused_keys
    )
    assert refused == 0  # a refused hold leaves nothing behind
    await assert_invariants(db)


async def test_a_batch_of_settlements_gives_each_its_own_outcome(
    component: AccountComponent, db: Any, batches: tuple[PostgresHoldStore, list[Any]]
) -> None:
    store, ran = batches
    consumer = await new_account(component, funds=100_000)
    operator = await new_account(component)
    blocker, paid, unknown_operator, released, too_big, plain = [
        await hold(store, consumer, 10_000) for _ in range(6)
    ]
    await settle(store, released.hold_id, 0)
    line = SettlementLine(operator, "node-1", "m", 10)
    stranger = SettlementLine(uuid.uuid4(), "node-2", "m", 10)
    revenue_before = await db.fetchval(
        "SELECT sum(credits_posted) FROM ledger_accounts WHERE kind = 'platform_revenue'"
    )
    outcomes = await behind_another(
        lambda: settle(store, blocker.hold_id, 0),
        [
            lambda: settle(store, paid.hold_id, 5_000, [line]),
            lambda: settle(store, unknown_operator.hold_id, 5_000, [stranger]),
            lambda: settle(store, uuid.uuid4(), 1),
            lambda: settle(store, released.hold_id, 100),
            lambda: settle(store, too_big.hold_id, 10_001),
            lambda: settle(store, plain.hold_id, 2_000),
        ],
    )
    assert ("settlements", 6) in ran
    settled, no_operator, no_hold, resolved, above, platform_only = outcomes
    assert isinstance(settled, Hold)
    assert (settled.status, settled.captured) == (HoldStatus.SETTLED, 5_000)
    assert isinstance(no_operator, NotFound)
    assert isinstance(no_hold, NotFound)
    assert isinstance(resolved, HoldAlreadyResolved)
    assert isinstance(above, InvalidArgument)
    assert isinstance(platform_only, Hold)
    assert platform_only.captured == 2_000
    # Refused settlements changed nothing: their holds are still open, with no events.
    statuses = await db.fetch(
        "SELECT id, status FROM transfers WHERE id = ANY($1::uuid[])",
        [unknown_operator.hold_id, too_big.hold_id],
    )
    assert {row["status"] for row in statuses} == {"pending"}
    events = await db.fetch(
        "SELECT kind, payload->>'hold_id' AS hold FROM ledger_outbox "
        "WHERE payload->>'hold_id' = ANY($1::text[])",
        [str(h.hold_id) for h in (paid, unknown_operator, too_big, plain)],
    )
    assert sorted((e["kind"], e["hold"]) for e in events) == sorted(
        [
            ("contribution.recorded", str(paid.hold_id)),
            ("usage.settled", str(paid.hold_id)),
            ("usage.settled", str(plain.hold_id)),
        ]
    )
    # 80 % of 5,000 to the operator; the platform gets the rest and all of 2,000.
    assert (await component.billing.get_balance(ADMIN, str(operator))).earned == 4_000
    revenue_after = await db.fetchval(
        "SELECT sum(credits_posted) FROM ledger_accounts WHERE kind = 'platform_revenue'"
    )
    assert revenue_after - revenue_before == 1_000 + 2_000
    # Captured 7,000; the two refused settlements' holds are still held.
    assert await available(component, consumer) == (100_000 - 7_000 - 20_000, 20_000)
    await assert_invariants(db)


async def test_a_hold_resolved_between_the_read_and_the_write_is_settled_once(
    component: AccountComponent,
    db: Any,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweeper releases the hold after the settlement read it as pending: the
    settlement's write changes nothing, and reading the hold again refuses it."""
    pool = await create_pool(postgres_dsn)
    try:
        store = PostgresHoldStore(pool)
        consumer = await new_account(component, funds=10_000)
        expires = datetime.now(UTC) + timedelta(milliseconds=200)
        fingerprint = request_fingerprint("hold", consumer, 1_000)
        held = await store.create_hold(consumer, 1_000, expires, uuid.uuid4().hex, fingerprint)
        await asyncio.sleep(0.3)
        apply = hold_settlement._Writes.apply
        swept: list[int] = []

        async def released_first(writes: Any, pool: Any) -> set[uuid.UUID]:
            if not swept:
                swept.append(await store.release_expired_holds(10))
            return await apply(writes, pool)

        monkeypatch.setattr(hold_settlement._Writes, "apply", released_first)
        with pytest.raises(HoldAlreadyResolved):
            await settle(store, held.hold_id, 600)
        assert swept[0] >= 1
        captures = await db.fetchval(
            "SELECT count(*) FROM transfers WHERE pending_id = $1", held.hold_id
        )
        assert captures == 0
        assert await available(component, consumer) == (10_000, 0)
        await assert_invariants(db)
    finally:
        await pool.close()


async def test_holds_spread_over_the_platform_shards_and_reads_sum_them(
    component: AccountComponent, db: Any
) -> None:
    for account in (CASH_IN, PLATFORM_REVENUE, CASH_OUT):
        rows = await db.fetch(
            "SELECT id FROM ledger_accounts WHERE kind = $1 ORDER BY shard", account.kind
        )
        assert tuple(row["id"] for row in rows) == account.shards
    consumer = str(await new_account(component, funds=1_000_000))
    billing = component.billing
    before = await billing.summary(ADMIN)
    holds = [
        await billing.create_hold(ADMIN, consumer, 100, uuid.uuid4().hex, None) for _ in range(20)
    ]
    await asyncio.gather(*(billing.settle_hold(ADMIN, str(h.hold_id), 60) for h in holds))
    shards = await db.fetchval(
        "SELECT count(DISTINCT credit_account_id) FROM transfers WHERE id = ANY($1::uuid[])",
        [h.hold_id for h in holds],
    )
    assert shards > 1  # each of 20 picks one of 16 at random
    after = await billing.summary(ADMIN)
    assert after.platform_revenue - before.platform_revenue == 20 * 60
    await assert_invariants(db)


async def test_a_ledger_from_before_the_shards_upgrades_keeping_its_totals(
    postgres_dsn: str,
) -> None:
    async with fresh_database(postgres_dsn) as dsn:
        pool = await create_pool(dsn)
        try:
            migrations = load_migrations("account", MIGRATIONS)
            shards = next(m for m in migrations if m.name == "0008_system_account_shards")
            await apply_migrations(pool, migrations[: shards.version - 1])
            hold_id = await pool.fetchval(_LEDGER_BEFORE_SHARDS)
            before = await PostgresLedgerStore(pool).summary()
            await apply_migrations(pool, migrations)
            assert await PostgresLedgerStore(pool).summary() == before
            assert (
                await pool.fetchval("SELECT count(*) FROM ledger_accounts WHERE owner_id IS NULL")
                == 3 * SHARDS + 1
            )
            # The hold taken before the upgrade settles on the row it credited.
            store = PostgresHoldStore(pool)
            settled = await settle(store, hold_id, 300)
            assert (settled.status, settled.captured) == (HoldStatus.SETTLED, 300)
            after = await PostgresLedgerStore(pool).summary()
            assert after.platform_revenue == before.platform_revenue + 300
            async with pool.acquire() as conn:
                await assert_invariants(conn)
        finally:
            await pool.close()


@contextlib.asynccontextmanager
async def fresh_database(dsn: str) -> AsyncIterator[str]:
    name = f"resultity_upgrade_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# A consumer topped up with 1,000 from cash-in, a capture of 200 to the platform
# and an open hold of 500, on the single system rows of migrations 0001-0005.
_LEDGER_BEFORE_SHARDS = """
WITH account AS (
    INSERT INTO accounts (id, name) VALUES (gen_random_uuid(), 'before') RETURNING id
), consumer AS (
    INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits,
                                 credits_posted, debits_posted, debits_pending)
    SELECT gen_random_uuid(), id, 'consumer', true, 1000, 200, 500 FROM account
    RETURNING id
), moved AS (
    UPDATE ledger_accounts SET
        debits_posted = debits_posted + CASE kind WHEN 'cash_in' THEN 1000 ELSE 0 END,
        credits_posted = credits_posted + CASE kind WHEN 'platform_revenue' THEN 200 ELSE 0 END,
        credits_pending = credits_pending + CASE kind WHEN 'platform_revenue' THEN 500 ELSE 0 END
    WHERE kind IN ('cash_in', 'platform_revenue')
), top_up AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status)
    SELECT gen_random_uuid(), '00000000-0000-4000-8000-000000000001', id, 1000, 'top_up', 'posted'
    FROM consumer
), spent AS (
    INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status)
    SELECT gen_random_uuid(), id, '00000000-0000-4000-8000-000000000002', 200,
           'subscription_charge', 'posted'
    FROM consumer
)
INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status,
                       expires_at)
SELECT gen_random_uuid(), id, '00000000-0000-4000-8000-000000000002', 500, 'hold', 'pending',
       now() + interval '1 hour'
FROM consumer RETURNING id
"""


async def test_contribution_events_arriving_together_are_each_counted_once(
    postgres_dsn: str, component: AccountComponent
) -> None:
    pool = await create_pool(postgres_dsn)
    try:
        earnings = OperatorEarnings(PostgresEarningsStore(pool))
        operators = [str(uuid.uuid4()) for _ in range(2)]

        def event(operator: str, epoch: int) -> LedgerEvent:
            payload = {"operator_account_id": operator, "epoch": epoch, "tokens": 10, "amount": 80}
            return LedgerEvent(uuid.uuid4(), CONTRIBUTION_RECORDED, payload, datetime.now(UTC))

        seen = event(operators[0], 1)
        await earnings.project(seen)
        events = [event(operators[0], 1) for _ in range(5)] + [event(operators[1], 2)] * 3
        await asyncio.gather(*(earnings.project(e) for e in [*events, seen, *events]))
        assert await earnings.operator_earnings(ADMIN, operators[0], 0) == [
            ContributionTotal(1, 6, 60, 480)
        ]
        assert await earnings.operator_earnings(ADMIN, operators[1], 0) == [
            ContributionTotal(2, 1, 10, 80)
        ]
    finally:
        await pool.close()


async def test_usage_records_arriving_together_are_each_counted_once(
    postgres_dsn: str, component: AccountComponent
) -> None:
    pool = await create_pool(postgres_dsn)
    try:
        store = PostgresUsageStore(pool)
        account = uuid.uuid4()
        hour = datetime(2026, 3, 1, 10, tzinfo=UTC)

        def record(minute: int, charged: int) -> UsageRecord:
            settled_at = hour + timedelta(minutes=minute)
            return UsageRecord(
                uuid.uuid4(), account, HoldStatus.SETTLED, 100, charged, 7, settled_at
            )

        first = record(0, 10)
        assert await store.add(first)
        later = [record(minute, 20) for minute in (1, 30, 59, 60, 61)]
        counted = await asyncio.gather(*(store.add(r) for r in [*later, first, *later]))
        assert counted == [True] * 5 + [False] * 6
        buckets = await store.totals(account, Interval.HOUR, hour)
        assert [(b.start, b.requests, b.tokens, b.charged) for b in buckets] == [
            (hour, 4, 28, 70),
            (hour + timedelta(hours=1), 2, 14, 40),
        ]
    finally:
        await pool.close()
