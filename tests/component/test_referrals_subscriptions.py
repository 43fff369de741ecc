"""Referral bonuses (paid from the promotional pool, capped) and paid subscriptions:
charges, renewals, lapses and allowance expiry."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from core.errors import FailedPrecondition, InsufficientQuota, InvalidArgument, NotFound
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.ledger import TransferKind
from server.account.profiles import ReferralRules
from server.account.subscription_store import PostgresSubscriptionStore
from server.account.subscriptions import (
    RenewalReport,
    Subscription,
    SubscriptionService,
    SubscriptionStatus,
    add_months,
    period_index,
    unused_allowance,
)
from server.secrets import PlatformSecrets

ADMIN = Principal.service()


@pytest.fixture(scope="module")
async def component(postgres_dsn: str) -> AsyncIterator[AccountComponent]:
    component = await AccountComponent.start(postgres_dsn, PlatformSecrets.generate())
    yield component
    await component.stop()


def key() -> str:
    return uuid.uuid4().hex


async def test_referral_bonus_is_a_capped_share_paid_from_the_pool(
    component: AccountComponent,
) -> None:
    service, billing = component.service, component.billing
    await service.set_referral_rules(ADMIN, ReferralRules(1000, 2, 1_500))
    referrer = str((await service.create_account(ADMIN, "referrer")).account_id)
    code = await service.referral_code(ADMIN, referrer)
    assert await service.referral_code(ADMIN, referrer) == code
    with pytest.raises(InvalidArgument):
        await service.create_account(ADMIN, "x", referral_code="NOSUCHCODE")
    referee = await service.create_account(ADMIN, "referee", referral_code=code)
    assert str(referee.referred_by) == referrer
    referee_id = str(referee.account_id)

    # An empty pool pays nothing, and never creates credits.
    pool = (await billing.summary(ADMIN)).promotional_pool
    if pool:
        with pytest.raises(InsufficientQuota):
            await billing.grant(ADMIN, referee_id, pool + 1, key())
        await billing.grant(ADMIN, referrer, pool, key())
    first = await billing.top_up(ADMIN, referee_id, 10_000, key())
    assert first.referral_bonus == 0

    await billing.fund_promotional_pool(ADMIN, 100_000, key())
    second = await billing.top_up(ADMIN, referee_id, 10_000, key())  # 10% = 1,000
    assert second.referral_bonus == 1_000
    third = await billing.top_up(ADMIN, referee_id, 10_000, key())  # only 2 top-ups rewarded
    assert third.referral_bonus == 0
    balance = await billing.get_balance(ADMIN, referrer)
    assert balance.available >= 1_000
    referrals = await service.list_referrals(ADMIN, referrer)
    assert [(str(r.referee_account_id), r.bonus_paid, r.rewarded_top_ups) for r in referrals] == [
        (referee_id, 1_000, 1)
    ]
    # The cap: a second referee's large first top-up earns at most max_bonus.
    other = await service.create_account(ADMIN, "referee2", referral_code=code)
    capped = await billing.top_up(ADMIN, str(other.account_id), 1_000_000, key())
    assert capped.referral_bonus == 1_500


def test_periods_are_calendar_months() -> None:
    start = datetime(2025, 1, 31, 12, tzinfo=UTC)
    assert add_months(start, 1) == datetime(2025, 2, 28, 12, tzinfo=UTC)
    assert period_index(start, start) == 0
    assert period_index(start, datetime(2025, 2, 28, 11, tzinfo=UTC)) == 0
    assert period_index(start, datetime(2025, 2, 28, 12, tzinfo=UTC)) == 1
    assert period_index(start, datetime(2026, 1, 31, 12, tzinfo=UTC)) == 12


def test_allowance_counts_as_spent_first_and_never_takes_more_than_is_available() -> None:
    assert unused_allowance(5_000, 2_000, 10_000) == 3_000
    assert unused_allowance(5_000, 8_000, 10_000) == 0
    assert unused_allowance(5_000, 0, 1_200) == 1_200


class Clocked:
    """A subscription service whose clock the test moves."""

    def __init__(self, component: AccountComponent) -> None:
        self.now = datetime.now(UTC)
        self.service = SubscriptionService(
            PostgresSubscriptionStore(component._pool), clock=lambda: self.now
        )

    def months_later(self, subscription: Subscription, months: int) -> None:
        self.now = add_months(subscription.started_at, months) + timedelta(seconds=1)


async def _funded(component: AccountComponent, credits: int) -> str:
    account = str((await component.service.create_account(ADMIN, "subscriber")).account_id)
    if credits:
        await component.billing.top_up(ADMIN, account, credits, key())
    return account


async def _spend(component: AccountComponent, account: str, amount: int) -> None:
    hold = await component.billing.create_hold(ADMIN, account, amount, key(), None)
    await component.billing.settle_hold(ADMIN, str(hold.hold_id), amount)


async def test_subscribing_pays_the_price_or_creates_nothing(component: AccountComponent) -> None:
    clocked = Clocked(component)
    plan = await clocked.service.create_plan(ADMIN, "basic", 3_000, 5_000)
    account = await _funded(component, 2_000)
    with pytest.raises(InsufficientQuota):
        await clocked.service.subscribe(ADMIN, account, str(plan.plan_id))
    assert (await clocked.service.list_subscriptions(ADMIN, account, 0, ""))[0] == []
    assert (await component.billing.get_balance(ADMIN, account)).available == 2_000

    await component.billing.top_up(ADMIN, account, 3_000, key())
    revenue = (await component.billing.summary(ADMIN)).platform_revenue
    subscription = await clocked.service.subscribe(ADMIN, account, str(plan.plan_id))
    assert subscription.periods_granted == 1
    assert (await component.billing.summary(ADMIN)).platform_revenue - revenue == 3_000
    assert (await component.billing.get_balance(ADMIN, account)).available == 5_000 - 3_000 + 5_000
    with pytest.raises(FailedPrecondition):
        await clocked.service.subscribe(ADMIN, account, str(plan.plan_id))

    # Cancelled: no more charges; the allowance left expires with the period.
    await _spend(component, account, 1_000)
    await clocked.service.cancel(ADMIN, str(subscription.subscription_id))
    clocked.months_later(subscription, 1)
    await clocked.service.renew(ADMIN)
    assert await clocked.service.renew(ADMIN) == RenewalReport()
    # 5,000 granted - 1,000 spent = 4,000 unused, taken back.
    assert (await component.billing.get_balance(ADMIN, account)).available == 2_000


async def test_renewal_charges_grants_and_expires_each_period_once(
    component: AccountComponent,
) -> None:
    clocked = Clocked(component)
    plan = await clocked.service.create_plan(ADMIN, "pro", 3_000, 5_000)
    account = await _funded(component, 10_000)
    subscription = await clocked.service.subscribe(ADMIN, account, str(plan.plan_id))

    async def available() -> int:
        return (await component.billing.get_balance(ADMIN, account)).available

    assert await available() == 12_000
    await _spend(component, account, 2_000)
    # Within the period, renewal does nothing, however often it runs.
    await clocked.service.renew(ADMIN)
    assert await clocked.service.renew(ADMIN) == RenewalReport()
    assert await available() == 10_000

    clocked.months_later(subscription, 1)
    first = await clocked.service.renew(ADMIN)
    # Other tests' subscriptions share the database: at least ours.
    assert first.granted >= 1
    assert first.expired_periods >= 1
    assert first.returned >= 3_000
    assert await clocked.service.renew(ADMIN) == RenewalReport()
    # Period 0: 5,000 - 2,000 spent = 3,000 expired; period 1: -3,000 price, +5,000.
    assert await available() == 10_000 - 3_000 - 3_000 + 5_000
    renewed = await clocked.service.get_active(ADMIN, account)
    assert renewed.periods_granted == 2
    history, _ = await component.billing.list_transactions(ADMIN, account, 0, "")
    # The charge and the grant share a transaction (and timestamp): any order.
    assert {(t.kind, t.amount) for t in history[:3]} == {
        (TransferKind.SUBSCRIPTION_ALLOWANCE, 5_000),
        (TransferKind.SUBSCRIPTION_CHARGE, -3_000),
        (TransferKind.ALLOWANCE_EXPIRY, -3_000),
    }

    # Credits reserved elsewhere are not taken; the price then cannot be paid.
    await component.billing.create_hold(ADMIN, account, 4_000, key(), None)
    clocked.months_later(subscription, 2)
    lapsing = await clocked.service.renew(ADMIN)
    assert lapsing.lapsed >= 1
    assert await clocked.service.renew(ADMIN) == RenewalReport()
    balance = await component.billing.get_balance(ADMIN, account)
    assert (balance.available, balance.held) == (0, 4_000)
    [lapsed], _ = await clocked.service.list_subscriptions(ADMIN, account, 0, "")
    assert (lapsed.status, lapsed.periods_granted) == (SubscriptionStatus.LAPSED, 2)
    with pytest.raises(NotFound):
        await clocked.service.get_active(ADMIN, account)
