"""An in-memory ledger behind the account layer's HoldStore port (and LedgerStore's
balances and top-ups), for testing BillingService's holds and settlements without
PostgreSQL.

It takes the decisions the PostgreSQL stores take under their locks with the same pure
rules (server/account/ledger.py): idempotency by key and fingerprint, funds checked
when a hold reserves them, ``resolve_hold`` for settling, ``split_capture`` for the
operators' shares. It keeps no double-entry accounts, only what a caller can see:
available, held and earned per account, and the platform's revenue.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from core.errors import InsufficientQuota, NotFound
from server.account.ledger import (
    Balance,
    Hold,
    HoldStatus,
    SettlementLine,
    TopUpResult,
    ensure_same_request,
    resolve_hold,
    split_capture,
)

OPERATOR_SHARE_BPS = 8_000


@dataclass
class _Keyed:
    fingerprint: str
    result: TopUpResult | Hold


class InMemoryLedger:
    """HoldStore, and LedgerStore's ``get_balance`` and ``top_up``, over dictionaries;
    ``clock`` is the database's now()."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self.available: dict[UUID, int] = {}
        self.held: dict[UUID, int] = defaultdict(int)
        self.earned: dict[UUID, int] = defaultdict(int)
        self.platform_revenue = 0
        self.holds: dict[UUID, Hold] = {}
        self._settle_fingerprints: dict[UUID, str] = {}
        self._keys: dict[str, _Keyed] = {}
        self.sweeps: list[int] = []  # the limit of each release_expired_holds call

    def open_account(self, account_id: UUID) -> None:
        self.available.setdefault(account_id, 0)

    # LedgerStore (the parts holds need)

    async def get_balance(self, account_id: UUID) -> Balance | None:
        if account_id not in self.available:
            return None
        return Balance(
            account_id, self.available[account_id], self.held[account_id], self.earned[account_id]
        )

    async def top_up(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult:
        if (replay := self._replay(idempotency_key, fingerprint)) is not None:
            assert isinstance(replay, TopUpResult)
            return replay
        if account_id not in self.available:
            raise NotFound(f"Account {account_id} not found")
        self.available[account_id] += amount
        balance = await self.get_balance(account_id)
        assert balance is not None
        result = TopUpResult(uuid.uuid4(), balance)
        self._keys[idempotency_key] = _Keyed(fingerprint, result)
        return result

    # HoldStore

    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold:
        if (replay := self._replay(idempotency_key, fingerprint)) is not None:
            assert isinstance(replay, Hold)
            return self.holds[replay.hold_id]
        if account_id not in self.available:
            raise NotFound(f"Account {account_id} not found")
        if amount > self.available[account_id]:
            raise InsufficientQuota(f"Not enough available credits for a hold of {amount}")
        self.available[account_id] -= amount
        self.held[account_id] += amount
        hold = Hold(uuid.uuid4(), account_id, amount, 0, HoldStatus.OPEN, expires_at)
        self.holds[hold.hold_id] = hold
        self._keys[idempotency_key] = _Keyed(fingerprint, hold)
        return hold

    async def settle_hold(
        self,
        hold_id: UUID,
        capture: int,
        lines: Sequence[SettlementLine],
        total_tokens: int,
        fingerprint: str,
    ) -> Hold:
        hold = self.holds.get(hold_id)
        if hold is None:
            raise NotFound(f"Hold {hold_id} not found")
        status = resolve_hold(hold, capture, fingerprint, self._settle_fingerprints.get(hold_id))
        if status is None:
            return hold
        if status is HoldStatus.RELEASED:
            lines = ()
        for line in lines:
            if line.operator_account_id not in self.available:
                raise NotFound(f"Operator account {line.operator_account_id} not found")
        parts, platform = split_capture(
            capture, OPERATOR_SHARE_BPS, [line.tokens for line in lines], total_tokens
        )
        for line, part in zip(lines, parts, strict=True):
            self.earned[line.operator_account_id] += part
        self.platform_revenue += platform
        self._resolve(hold, status, capture)
        self._settle_fingerprints[hold_id] = fingerprint
        return self.holds[hold_id]

    async def release_expired_holds(self, limit: int) -> int:
        self.sweeps.append(limit)
        now = self._clock()
        expired = [
            hold
            for hold in self.holds.values()
            if hold.status is HoldStatus.OPEN and hold.expires_at < now
        ][:limit]
        for hold in expired:
            self._resolve(hold, HoldStatus.RELEASED, 0)
        return len(expired)

    def _resolve(self, hold: Hold, status: HoldStatus, capture: int) -> None:
        self.held[hold.account_id] -= hold.amount
        self.available[hold.account_id] += hold.amount - capture
        self.holds[hold.hold_id] = replace(hold, status=status, captured=capture)

    def _replay(self, idempotency_key: str, fingerprint: str) -> TopUpResult | Hold | None:
        keyed = self._keys.get(idempotency_key)
        if keyed is None:
            return None
        ensure_same_request(keyed.fingerprint, fingerprint)
        return keyed.result
