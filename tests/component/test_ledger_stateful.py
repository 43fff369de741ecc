"""The real ledger and a plain in-memory model, driven side by side by Hypothesis.

Every step runs against PostgreSQL through BillingService; after every step
the balances of the model and the ledger must agree and the ledger-wide
invariants must hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from core.errors import HoldAlreadyResolved, InsufficientQuota
from server.account.authz import Principal
from server.account.component import AccountComponent
from server.account.ledger import SettlementLine, split_capture
from server.secrets import PlatformSecrets
from tests.component.test_ledger_invariants import INVARIANTS

ADMIN = Principal.service()
T = TypeVar("T")
amounts = st.integers(min_value=1, max_value=10_000)


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    component: AccountComponent
    db: Any

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)


@dataclass
class ModelHold:
    hold_id: str
    account: str
    amount: int
    resolved: bool = False


@dataclass
class Model:
    available: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    earned: dict[str, int] = field(default_factory=dict)
    top_ups: dict[str, tuple[str, int, str]] = field(default_factory=dict)


HARNESS: Harness | None = None


class LedgerMachine(RuleBasedStateMachine):
    accounts = Bundle("accounts")
    holds = Bundle("holds")
    top_up_keys = Bundle("top_up_keys")

    def __init__(self) -> None:
        super().__init__()
        assert HARNESS is not None
        self.h = HARNESS
        self.model = Model()
        self.operator = ""
        self.share_bps = 0

    @initialize(target=accounts)
    def create_accounts(self) -> Any:
        created = []
        for _ in range(3):
            account = self.h.run(self.h.component.service.create_account(ADMIN, "model"))
            account_id = str(account.account_id)
            self.model.available[account_id] = 0
            self.model.held[account_id] = 0
            created.append(account_id)
        operator = self.h.run(self.h.component.service.create_account(ADMIN, "operator"))
        self.operator = str(operator.account_id)
        self.model.earned[self.operator] = 0
        self.share_bps = self.h.run(
            self.h.component.contributions.settlement_policy(ADMIN)
        ).operator_share_bps
        return multiple(*created)

    @rule(target=top_up_keys, account=accounts, amount=amounts)
    def top_up(self, account: str, amount: int) -> str:
        key = uuid.uuid4().hex
        result = self.h.run(self.h.component.billing.top_up(ADMIN, account, amount, key))
        self.model.available[account] += amount
        self.model.top_ups[key] = (account, amount, str(result.transfer_id))
        return key

    @rule(key=top_up_keys)
    def replay_top_up(self, key: str) -> None:
        account, amount, transfer_id = self.model.top_ups[key]
        result = self.h.run(self.h.component.billing.top_up(ADMIN, account, amount, key))
        assert str(result.transfer_id) == transfer_id

    @rule(target=holds, account=accounts, amount=amounts)
    def create_hold(self, account: str, amount: int) -> Any:
        billing = self.h.component.billing
        if self.model.available[account] < amount:
            with pytest.raises(InsufficientQuota):
                self.h.run(billing.create_hold(ADMIN, account, amount, uuid.uuid4().hex, None))
            return multiple()
        hold = self.h.run(billing.create_hold(ADMIN, account, amount, uuid.uuid4().hex, None))
        self.model.available[account] -= amount
        self.model.held[account] += amount
        return ModelHold(str(hold.hold_id), account, amount)

    @rule(
        hold=holds,
        fraction=st.floats(min_value=0, max_value=1),
        tokens=st.integers(0, 100),
        unclaimed=st.integers(0, 100),
    )
    def settle(self, hold: ModelHold, fraction: float, tokens: int, unclaimed: int) -> None:
        """Settles with tokens of nodes without an operator besides the line's."""
        capture = int(hold.amount * fraction)
        lines = [SettlementLine(uuid.UUID(self.operator), "node", "m", tokens)]
        total = tokens + unclaimed
        call = self.h.component.billing.settle_hold(ADMIN, hold.hold_id, capture, lines, total)
        if hold.resolved:
            # Settling again differently is refused; the model does not change.
            with contextlib.suppress(HoldAlreadyResolved):
                self.h.run(call)
            return
        self.h.run(call)
        hold.resolved = True
        self.model.held[hold.account] -= hold.amount
        self.model.available[hold.account] += hold.amount - capture
        if capture:
            parts, _ = split_capture(capture, self.share_bps, [tokens], total)
            self.model.earned[self.operator] += parts[0]

    @invariant()
    def balances_match_the_model(self) -> None:
        for account in self.model.available:
            balance = self.h.run(self.h.component.billing.get_balance(ADMIN, account))
            assert (balance.available, balance.held) == (
                self.model.available[account],
                self.model.held[account],
            )
            assert balance.available >= 0
        if self.operator:
            earned = self.h.run(self.h.component.billing.get_balance(ADMIN, self.operator))
            assert earned.earned == self.model.earned[self.operator]

    @invariant()
    def ledger_is_conserved(self) -> None:
        row = self.h.run(self.h.db.fetchrow(INVARIANTS))
        assert dict(row) == {
            "posted_gap": 0,
            "pending_gap": 0,
            "overdrawn": 0,
            "negative_pending": 0,
        }


@pytest.fixture
def harness(postgres_dsn: str) -> Iterator[Harness]:
    """The component on its own event loop: Hypothesis' state machine is synchronous."""
    global HARNESS
    loop = asyncio.new_event_loop()
    component = loop.run_until_complete(
        AccountComponent.start(postgres_dsn, PlatformSecrets.generate(), hold_sweep_interval_s=3600)
    )
    db = loop.run_until_complete(asyncpg.connect(postgres_dsn))
    HARNESS = Harness(loop, component, db)
    try:
        yield HARNESS
    finally:
        HARNESS = None
        loop.run_until_complete(db.close())
        loop.run_until_complete(component.stop())
        loop.close()


def test_ledger_matches_an_in_memory_model(harness: Harness) -> None:
    test = LedgerMachine.TestCase
    test.settings = settings(
        max_examples=15,
        stateful_step_count=20,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    test("runTest").runTest()
