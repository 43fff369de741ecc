"""Subscriptions: plans with a monthly price and credit allowance.

Period n of a subscription starts n calendar months after it started. Each
period is paid for and then granted once: the price moves from the
subscriber's available credits to platform revenue, the allowance from
cash-in to the subscriber, with idempotency keys naming the subscription and
the period, in the transaction that advances the subscription's period
counter under its row lock; renewal running twice (or on two replicas)
charges and grants nothing twice. A renewal whose price cannot be paid
lapses the subscription. Missed periods are not back-filled: renewal charges
and grants the current one.

A period's allowance expires when the period ends and its unused part goes
back to cash-in, where it came from. Allowance counts as spent first, so
unused = allowance - the subscriber's captured spend within the period, at
least 0 and at most what is available then (credits the subscriber already
reserved or spent otherwise are never taken). Cancelling stops renewals; the
current period's allowance stays until the period ends.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol
from uuid import UUID

import structlog

from core.errors import InvalidArgument, NotFound
from core.ids import parse_id
from server.account.authz import Principal
from server.account.ledger import MAX_AMOUNT
from server.account.profiles import validate_name
from server.common.paging import decode_cursor, encode_cursor, page_size

log = structlog.get_logger(__name__)


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"
    # Renewal could not charge the price.
    LAPSED = "lapsed"


@dataclass(frozen=True)
class Plan:
    plan_id: UUID
    name: str
    monthly_price: int
    monthly_allowance: int
    created_at: datetime


@dataclass(frozen=True)
class Subscription:
    subscription_id: UUID
    account_id: UUID
    plan_id: UUID
    status: SubscriptionStatus
    started_at: datetime
    periods_granted: int

    @property
    def current_period(self) -> tuple[datetime, datetime]:
        """The period granted last (the first one before any grant)."""
        n = max(self.periods_granted - 1, 0)
        return add_months(self.started_at, n), add_months(self.started_at, n + 1)


@dataclass(frozen=True)
class RenewalReport:
    """What one renewal run did."""

    granted: int = 0
    lapsed: int = 0
    expired_periods: int = 0
    returned: int = 0


def unused_allowance(allowance: int, spent: int, available: int) -> int:
    """The part of a period's allowance that expires (see the module docstring)."""
    return max(0, min(allowance - spent, available))


def add_months(start: datetime, months: int) -> datetime:
    """``start`` moved by whole calendar months; the day is clamped (Jan 31 -> Feb 28)."""
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


def period_index(start: datetime, now: datetime) -> int:
    """The index of the period ``now`` falls in (0 for the first)."""
    months = (now.year - start.year) * 12 + now.month - start.month
    while months > 0 and add_months(start, months) > now:
        months -= 1
    return max(months, 0)


class SubscriptionStore(Protocol):
    async def insert_plan(self, name: str, price: int, allowance: int) -> Plan: ...
    async def list_plans(self) -> list[Plan]: ...
    async def subscribe(self, account_id: UUID, plan_id: UUID, now: datetime) -> Subscription: ...
    async def active(self, account_id: UUID) -> Subscription | None: ...
    async def get(self, subscription_id: UUID) -> Subscription | None: ...
    async def list_subscriptions(
        self, account_id: UUID | None, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Subscription]: ...
    async def cancel(self, subscription_id: UUID) -> Subscription | None: ...
    async def expire_ended_periods(self, now: datetime) -> tuple[int, int]:
        """Expires every ended period's allowance: (periods, micro-credits returned)."""
        ...

    async def renew_due(self, now: datetime) -> tuple[int, int]:
        """Charges and grants every active subscription's current period: (granted, lapsed)."""
        ...


class SubscriptionService:
    def __init__(
        self,
        store: SubscriptionStore,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._clock = clock

    async def create_plan(self, caller: Principal, name: str, price: int, allowance: int) -> Plan:
        caller.require_admin()
        if not (0 <= price <= MAX_AMOUNT and 0 <= allowance <= MAX_AMOUNT):
            raise InvalidArgument("price and allowance must not be negative", field="price")
        plan = await self._store.insert_plan(validate_name(name), price, allowance)
        log.info("plan created", plan_id=str(plan.plan_id))
        return plan

    async def list_plans(self, caller: Principal) -> list[Plan]:
        return await self._store.list_plans()

    async def subscribe(self, caller: Principal, account_id: str, plan_id: str) -> Subscription:
        owner = parse_id(account_id, field="account_id")
        caller.require_access(owner)
        subscription = await self._store.subscribe(
            owner, parse_id(plan_id, field="plan_id"), self._clock()
        )
        log.info("subscribed", account_id=account_id, plan_id=plan_id)
        return subscription

    async def get_active(self, caller: Principal, account_id: str) -> Subscription:
        owner = parse_id(account_id, field="account_id")
        caller.require_access(owner)
        subscription = await self._store.active(owner)
        if subscription is None:
            raise NotFound(f"Account {account_id} has no active subscription")
        return subscription

    async def list_subscriptions(
        self, caller: Principal, account_id: str, requested_size: int, page_token: str
    ) -> tuple[list[Subscription], str]:
        owner = None
        if account_id:
            owner = parse_id(account_id, field="account_id")
            caller.require_access(owner)
        else:
            caller.require_admin()
        limit = page_size(requested_size)
        items = await self._store.list_subscriptions(owner, limit, decode_cursor(page_token))
        last = items[-1] if len(items) == limit else None
        return items, "" if last is None else encode_cursor(last.started_at, last.subscription_id)

    async def cancel(self, caller: Principal, subscription_id: str) -> Subscription:
        sub_id = parse_id(subscription_id, field="subscription_id")
        existing = await self._store.get(sub_id)
        if existing is None:
            raise NotFound(f"Subscription {subscription_id} not found")
        caller.require_access(existing.account_id)
        cancelled = await self._store.cancel(sub_id)
        assert cancelled is not None
        return cancelled

    async def renew(self, caller: Principal) -> RenewalReport:
        """Expires ended periods first, so renewal charges against what is left."""
        caller.require_admin()
        now = self._clock()
        expired, returned = await self._store.expire_ended_periods(now)
        granted, lapsed = await self._store.renew_due(now)
        report = RenewalReport(granted, lapsed, expired, returned)
        if report != RenewalReport():
            log.info("subscriptions renewed", report=str(report))
        return report
