"""Referral bonuses (paid from the promotional pool, capped) and subscription renewals."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.profiles import ReferralRules
from server.account.subscription_store import PostgresSubscriptionStore
from server.account.subscriptions import SubscriptionService, add_months, period_index
from server.common.errors import FailedPrecondition, InsufficientQuota, InvalidArgument
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


async def test_renewal_grants_each_period_once(
    component: AccountComponent, postgres_dsn: str
) -> None:
    now = [datetime.now(UTC)]
    subscriptions = SubscriptionService(
        PostgresSubscriptionStore(component._pool, component.billing._store),  # type: ignore[arg-type]
        clock=lambda: now[0],
    )
    plan = await subscriptions.create_plan(ADMIN, "pro", 20_000_000, 5_000)
    account = str((await component.service.create_account(ADMIN, "subscriber")).account_id)
    subscription = await subscriptions.subscribe(ADMIN, account, str(plan.plan_id))
    assert subscription.periods_granted == 1
    with pytest.raises(FailedPrecondition):
        await subscriptions.subscribe(ADMIN, account, str(plan.plan_id))

    async def available() -> int:
        return (await component.billing.get_balance(ADMIN, account)).available

    assert await available() == 5_000
    await subscriptions.renew(ADMIN)
    await subscriptions.renew(ADMIN)
    assert await available() == 5_000  # same period: nothing more
    now[0] = add_months(subscription.started_at, 1) + timedelta(seconds=1)
    await subscriptions.renew(ADMIN)
    await subscriptions.renew(ADMIN)
    assert await available() == 10_000
    cancelled = await subscriptions.cancel(ADMIN, str(subscription.subscription_id))
    now[0] = add_months(subscription.started_at, 2) + timedelta(seconds=1)
    await subscriptions.renew(ADMIN)
    assert await available() == 10_000
    assert cancelled.status.value == "cancelled"
