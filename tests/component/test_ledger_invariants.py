"""The ledger's invariants under concurrency, retries and random workloads.

Runs the account component's BillingService on the real PostgreSQL. The
database is shared by the test session, so invariants are checked over the
whole ledger (they must hold for every account, not only ours) and balances
only for the accounts a test created.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from core.errors import (
    DomainError,
    HoldAlreadyResolved,
    IdempotencyKeyReused,
    InsufficientQuota,
    InvalidArgument,
)
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.ledger import HoldStatus, SettlementLine
from server.account.profiles import ReferralRules
from server.secrets import PlatformSecrets

ADMIN = Principal.service()

# One statement, so one snapshot: every posted and pending total balances,
# and no account that may not go negative has.
INVARIANTS = """
SELECT sum(debits_posted) - sum(credits_posted) AS posted_gap,
       sum(debits_pending) - sum(credits_pending) AS pending_gap,
       count(*) FILTER (WHERE debits_must_not_exceed_credits
                        AND credits_posted - debits_posted - debits_pending < 0) AS overdrawn,
       count(*) FILTER (WHERE debits_pending < 0 OR credits_pending < 0) AS negative_pending
FROM ledger_accounts
"""


@pytest.fixture(scope="module")
async def component(postgres_dsn: str) -> AsyncIterator[AccountComponent]:
    component = await AccountComponent.start(
        postgres_dsn, PlatformSecrets.generate(), hold_sweep_interval_s=3600, pool_size=20
    )
    yield component
    await component.stop()


@pytest.fixture(scope="module")
async def db(postgres_dsn: str, component: AccountComponent) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


def key() -> str:
    return uuid.uuid4().hex


async def new_account(component: AccountComponent, funds: int = 0, referral: str = "") -> str:
    account = await component.service.create_account(ADMIN, "test", referral_code=referral)
    if funds:
        await component.billing.top_up(ADMIN, str(account.account_id), funds, key())
    return str(account.account_id)


async def assert_invariants(db: Any) -> None:
    row = await db.fetchrow(INVARIANTS)
    assert dict(row) == {"posted_gap": 0, "pending_gap": 0, "overdrawn": 0, "negative_pending": 0}


# The platform's revenue: the sum of its account's shards.
REVENUE = "SELECT sum(credits_posted) FROM ledger_accounts WHERE kind = 'platform_revenue'"


async def test_overspend_race_admits_exactly_one_of_200(
    component: AccountComponent, db: Any
) -> None:
    account = await new_account(component, funds=1_000)

    async def request() -> str:
        try:
            hold = await component.billing.create_hold(ADMIN, account, 1_000, key(), None)
        except InsufficientQuota:
            return "refused"
        await component.billing.settle_hold(ADMIN, str(hold.hold_id), 1_000)
        return "admitted"

    outcomes = await asyncio.gather(*(request() for _ in range(200)))
    assert outcomes.count("admitted") == 1
    assert outcomes.count("refused") == 199
    balance = await component.billing.get_balance(ADMIN, account)
    assert (balance.available, balance.held) == (0, 0)
    spent = await db.fetchval(
        """SELECT debits_posted - credits_posted FROM ledger_accounts
           WHERE owner_id = $1 AND kind = 'consumer'""",
        uuid.UUID(account),
    )
    assert spent == 0  # credited 1,000, spent 1,000: no overspend
    await assert_invariants(db)


async def test_idempotent_replays_make_one_transfer_with_identical_responses(
    component: AccountComponent, db: Any
) -> None:
    account = await new_account(component)
    top_up_key = key()
    results = await asyncio.gather(
        *(component.billing.top_up(ADMIN, account, 5_000, top_up_key) for _ in range(100))
    )
    assert len({result.transfer_id for result in results}) == 1
    assert (
        await db.fetchval("SELECT count(*) FROM transfers WHERE idempotency_key = $1", top_up_key)
        == 1
    )
    with pytest.raises(IdempotencyKeyReused):
        await component.billing.top_up(ADMIN, account, 5_001, top_up_key)
    other = await new_account(component)
    with pytest.raises(IdempotencyKeyReused):
        await component.billing.top_up(ADMIN, other, 5_000, top_up_key)

    hold_key = key()
    holds = await asyncio.gather(
        *(component.billing.create_hold(ADMIN, account, 3_000, hold_key, None) for _ in range(100))
    )
    assert all(hold == holds[0] for hold in holds)
    # A hold key reused for another kind of operation is refused too.
    with pytest.raises(IdempotencyKeyReused):
        await component.billing.top_up(ADMIN, account, 3_000, hold_key)

    operator = uuid.UUID(await new_account(component))
    line = SettlementLine(operator, "node-1", "model-a", 40)
    hold_id = str(holds[0].hold_id)
    settled = await asyncio.gather(
        *(component.billing.settle_hold(ADMIN, hold_id, 2_000, [line]) for _ in range(100)),
        return_exceptions=True,
    )
    assert all(result == settled[0] for result in settled)
    captures = await db.fetchval(
        "SELECT count(*) FROM transfers WHERE pending_id = $1", holds[0].hold_id
    )
    assert captures == 2  # operator share + platform fee, once
    balance = await component.billing.get_balance(ADMIN, account)
    assert (balance.available, balance.held) == (3_000, 0)
    await assert_invariants(db)


async def test_settlement_pays_operators_and_platform_and_records_contributions(
    component: AccountComponent, db: Any
) -> None:
    consumer = await new_account(component, funds=100_000)
    alice = uuid.UUID(await new_account(component))
    bob = uuid.UUID(await new_account(component))
    revenue_before = await db.fetchval(REVENUE)
    hold = await component.billing.create_hold(ADMIN, consumer, 50_000, key(), None)
    lines = [
        SettlementLine(alice, "node-a", "smollm2", 30),
        SettlementLine(bob, "node-b", "smollm2", 70),
    ]
    settled = await component.billing.settle_hold(ADMIN, str(hold.hold_id), 10_001, lines)
    assert settled.status is HoldStatus.SETTLED
    # 80% of 10,001 = 8,000 (rounded down) split 30:70; the rest is the platform's fee.
    alice_balance = await component.billing.get_balance(ADMIN, str(alice))
    bob_balance = await component.billing.get_balance(ADMIN, str(bob))
    assert (alice_balance.earned, bob_balance.earned) == (2_400, 5_600)
    assert alice_balance.available == 0  # earnings are not spendable credits
    revenue_after = await db.fetchval(REVENUE)
    assert revenue_after - revenue_before == 10_001 - 8_000
    consumer_balance = await component.billing.get_balance(ADMIN, consumer)
    assert (consumer_balance.available, consumer_balance.held) == (100_000 - 10_001, 0)

    records, _ = await component.contributions.list_contributions(ADMIN, str(bob), 0, "")
    assert [(r.node_id, r.model, r.tokens, r.amount, r.hold_id) for r in records] == [
        ("node-b", "smollm2", 70, 5_600, hold.hold_id)
    ]
    overall, epochs, epoch_seconds = await component.contributions.contribution_totals(
        ADMIN, str(alice), 0
    )
    assert (overall.jobs, overall.tokens, overall.amount) == (1, 30, 2_400)
    assert [(e.jobs, e.amount) for e in epochs] == [(1, 2_400)]
    assert epoch_seconds > 0

    history, _ = await component.billing.list_transactions(ADMIN, str(alice), 0, "")
    assert [(t.kind.value, t.amount, t.operator_earnings) for t in history] == [
        ("capture", 2_400, True)
    ]
    # Without lines the platform gets the whole capture.
    plain = await component.billing.create_hold(ADMIN, consumer, 1_000, key(), None)
    await component.billing.settle_hold(ADMIN, str(plain.hold_id), 999)
    assert await db.fetchval(REVENUE) - revenue_after == 999
    await assert_invariants(db)


async def test_concurrent_settlements_on_shared_accounts_all_complete(
    component: AccountComponent, db: Any
) -> None:
    """Holds, settlements, releases and top-ups racing on the same consumers and
    operators: none is refused by a deadlock, and every credit is accounted for."""
    billing = component.billing
    consumers = [await new_account(component, funds=1_000_000) for _ in range(2)]
    operators = [uuid.UUID(await new_account(component)) for _ in range(2)]
    spent = {consumer: 0 for consumer in consumers}
    earned = {operator: 0 for operator in operators}
    topped_up = {consumer: 0 for consumer in consumers}
    share_bps = (await component.contributions.settlement_policy(ADMIN)).operator_share_bps

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            consumer = rng.choice(consumers)
            if rng.random() < 0.2:
                await billing.top_up(ADMIN, consumer, 10, key())
                topped_up[consumer] += 10
                continue
            hold = await billing.create_hold(ADMIN, consumer, 1_000, key(), None)
            capture = rng.choice([0, 1_000, rng.randint(1, 999)])
            lines = [SettlementLine(op, f"node-{i}", "m", 10) for i, op in enumerate(operators)]
            await billing.settle_hold(ADMIN, str(hold.hold_id), capture, lines, 20)
            spent[consumer] += capture
            operators_part = capture * share_bps // 10_000
            for operator in operators:
                earned[operator] += operators_part * 10 // 20

    await asyncio.gather(*(worker(seed) for seed in range(24)))
    for consumer in consumers:
        balance = await billing.get_balance(ADMIN, consumer)
        expected = 1_000_000 + topped_up[consumer] - spent[consumer]
        assert (balance.available, balance.held) == (expected, 0)
    for operator in operators:
        assert (await billing.get_balance(ADMIN, str(operator))).earned == earned[operator]
    await assert_invariants(db)


async def test_tokens_no_line_claims_earn_the_platform_their_share(
    component: AccountComponent, db: Any
) -> None:
    consumer = await new_account(component, funds=100_000)
    alice = uuid.UUID(await new_account(component))
    bob = uuid.UUID(await new_account(component))
    lines = [
        SettlementLine(alice, "node-a", "m", 30),
        SettlementLine(bob, "node-b", "m", 20),
    ]
    hold = await component.billing.create_hold(ADMIN, consumer, 50_000, key(), None)
    # 50 more tokens came from a node without an operator.
    with pytest.raises(InvalidArgument):
        await component.billing.settle_hold(ADMIN, str(hold.hold_id), 10_001, lines, 49)
    revenue_before = await db.fetchval(REVENUE)
    settled = await component.billing.settle_hold(ADMIN, str(hold.hold_id), 10_001, lines, 100)
    # Operators' share: 80% of 10,001 = 8,000; alice 30/100 of it, bob 20/100.
    earned = [(await component.billing.get_balance(ADMIN, str(who))).earned for who in (alice, bob)]
    assert earned == [2_400, 1_600]
    assert await db.fetchval(REVENUE) - revenue_before == 10_001 - 4_000
    records, _ = await component.contributions.list_contributions(ADMIN, str(bob), 0, "")
    assert [(r.tokens, r.amount) for r in records] == [(20, 1_600)]
    # A replay returns the same result; another split of the same hold is refused.
    replay = await component.billing.settle_hold(ADMIN, str(hold.hold_id), 10_001, lines, 100)
    assert replay == settled
    with pytest.raises(HoldAlreadyResolved):
        await component.billing.settle_hold(ADMIN, str(hold.hold_id), 10_001, lines, 60)
    assert [
        (await component.billing.get_balance(ADMIN, str(who))).earned for who in (alice, bob)
    ] == [2_400, 1_600]
    await assert_invariants(db)


async def test_randomized_bank_workload_keeps_the_invariants_throughout(
    component: AccountComponent, db: Any, postgres_dsn: str
) -> None:
    billing = component.billing
    await billing.fund_promotional_pool(ADMIN, 200_000, key())
    await component.service.set_referral_rules(ADMIN, ReferralRules(1000, 3, 5_000))
    referrer = await new_account(component, funds=10_000)
    code = await component.service.referral_code(ADMIN, referrer)
    consumers = [await new_account(component, funds=20_000) for _ in range(4)]
    consumers += [await new_account(component, referral=code) for _ in range(2)]
    operators = [uuid.UUID(await new_account(component)) for _ in range(3)]
    stop = asyncio.Event()
    violations: list[dict[str, int]] = []
    checks = 0
    counts: dict[str, int] = {}

    async def reader() -> None:
        nonlocal checks
        conn = await asyncpg.connect(postgres_dsn)
        try:
            while not stop.is_set():
                row = dict(await conn.fetchrow(INVARIANTS))
                if any(row.values()):
                    violations.append(row)
                balances = await conn.fetch(
                    """SELECT credits_posted - debits_posted - debits_pending AS available
                       FROM ledger_accounts WHERE owner_id = ANY($1::uuid[])""",
                    [uuid.UUID(account) for account in consumers],
                )
                violations.extend({"negative": 1} for r in balances if r["available"] < 0)
                checks += 1
                await asyncio.sleep(0)
        finally:
            await conn.close()

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        open_holds: list[tuple[str, int]] = []
        for _ in range(40):
            account = rng.choice(consumers)
            action = rng.choice(["top_up", "hold", "hold", "capture", "release", "expire", "grant"])
            try:
                if action == "top_up":
                    await billing.top_up(ADMIN, account, rng.randint(1, 5_000), key())
                elif action == "hold":
                    hold = await billing.create_hold(
                        ADMIN, account, rng.randint(1, 8_000), key(), None
                    )
                    open_holds.append((str(hold.hold_id), hold.amount))
                elif action == "capture" and open_holds:
                    hold_id, amount = open_holds.pop(rng.randrange(len(open_holds)))
                    lines = [
                        SettlementLine(op, f"node-{i}", "m", rng.randint(0, 50))
                        for i, op in enumerate(rng.sample(operators, rng.randint(0, 3)))
                    ]
                    total = sum(line.tokens for line in lines) + rng.randint(0, 50)
                    await billing.settle_hold(ADMIN, hold_id, rng.randint(0, amount), lines, total)
                elif action == "release" and open_holds:
                    await billing.settle_hold(ADMIN, open_holds.pop()[0], 0)
                elif action == "expire":
                    soon = datetime.now(UTC) + timedelta(milliseconds=rng.randint(1, 30))
                    await billing.create_hold(ADMIN, account, rng.randint(1, 3_000), key(), soon)
                    await billing.release_expired_holds()
                elif action == "grant":
                    await billing.grant(ADMIN, account, rng.randint(1, 2_000), key())
            except DomainError as error:
                # Refusals (no funds, a hold the sweeper released first) are fine.
                counts[error.reason.value] = counts.get(error.reason.value, 0) + 1
            else:
                counts[action] = counts.get(action, 0) + 1

    readers = [asyncio.create_task(reader()) for _ in range(2)]
    await asyncio.gather(*(worker(seed) for seed in range(8)))
    await asyncio.sleep(0.05)
    await billing.release_expired_holds()
    stop.set()
    await asyncio.gather(*readers)

    print("workload outcomes", counts, "invariant checks", checks)
    assert violations == []
    assert checks > 0
    assert counts.get("capture", 0) > 0
    assert counts.get("hold", 0) > 0
    await assert_invariants(db)
    bonuses = await db.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM referral_bonuses WHERE referrer_id = $1",
        uuid.UUID(referrer),
    )
    # Referred accounts' top-ups paid bonuses, within the cap per referee.
    assert 0 < bonuses <= 2 * 5_000
    # Every running total equals the sum of the transfers behind it.
    assert await db.fetchval(TOTALS_MATCH_TRANSFERS) == 0


TOTALS_MATCH_TRANSFERS = """
WITH moves AS (
    SELECT debit_account_id AS id, amount AS dpo, 0 AS cpo, 0 AS dpe, 0 AS cpe
    FROM transfers WHERE status = 'posted'
    UNION ALL SELECT credit_account_id, 0, amount, 0, 0 FROM transfers WHERE status = 'posted'
    UNION ALL SELECT debit_account_id, 0, 0, amount, 0 FROM transfers WHERE status = 'pending'
    UNION ALL SELECT credit_account_id, 0, 0, 0, amount FROM transfers WHERE status = 'pending'),
sums AS (SELECT id, sum(dpo) AS dpo, sum(cpo) AS cpo, sum(dpe) AS dpe, sum(cpe) AS cpe
         FROM moves GROUP BY id)
SELECT count(*) FROM ledger_accounts la LEFT JOIN sums s ON s.id = la.id
WHERE la.debits_posted <> coalesce(s.dpo, 0) OR la.credits_posted <> coalesce(s.cpo, 0)
   OR la.debits_pending <> coalesce(s.dpe, 0) OR la.credits_pending <> coalesce(s.cpe, 0)
"""
