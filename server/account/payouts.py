"""Operator payouts: earned credits leave the platform for real money.

An operator requests a payout from its own earnings; the amount is reserved
like a hold (a pending transfer from the operator's earnings to the cash-out
account) but does not expire. An admin completes it once the money was paid
(the reservation is captured: the credits leave through cash-out) or rejects
it (the reservation is released). Requests are idempotent by key; resolving
again the same way is a replay. Imports neither grpc nor generated code nor
storage clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol
from uuid import UUID

import structlog

from core.errors import FailedPrecondition, InvalidArgument
from core.ids import parse_id
from server.account.authz import Principal
from server.account.ledger import (
    MAX_LINE_TEXT,
    SettlementPolicy,
    request_fingerprint,
    validate_amount,
    validate_idempotency_key,
)
from server.common.paging import decode_cursor, encode_cursor, page_size

log = structlog.get_logger(__name__)


class PayoutStatus(StrEnum):
    """The values are stored in SQL."""

    REQUESTED = "requested"
    COMPLETED = "completed"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Payout:
    payout_id: UUID
    account_id: UUID
    amount: int
    status: PayoutStatus
    # The payment reference (completed) or the reason (rejected).
    note: str
    requested_at: datetime
    resolved_at: datetime | None


class PayoutStore(Protocol):
    """Each method is one transaction; ``request`` raises InsufficientQuota and
    IdempotencyKeyReused itself, under the transaction's locks."""

    async def policy(self) -> SettlementPolicy: ...
    async def request(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> Payout: ...
    async def resolve(self, payout_id: UUID, outcome: PayoutStatus, note: str) -> Payout: ...
    async def list_payouts(
        self, account_id: UUID | None, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Payout]: ...


def resolution(payout: Payout, outcome: PayoutStatus, note: str) -> bool:
    """Whether resolving ``payout`` with ``outcome`` changes it (False: a replay)."""
    if payout.status is PayoutStatus.REQUESTED:
        return True
    if payout.status is outcome and payout.note == note:
        return False
    raise FailedPrecondition(f"The payout is already {payout.status.value}")


class PayoutService:
    def __init__(self, store: PayoutStore) -> None:
        self._store = store

    async def request_payout(
        self, caller: Principal, account_id: str, amount: int, idempotency_key: str
    ) -> Payout:
        owner = parse_id(account_id, field="account_id")
        caller.require_access(owner)
        validate_amount(amount, field="amount_micro_credits")
        validate_idempotency_key(idempotency_key)
        policy = await self._store.policy()
        if not policy.min_payout <= amount <= policy.max_payout:
            raise InvalidArgument(
                f"A payout is {policy.min_payout} to {policy.max_payout} micro-credits",
                field="amount_micro_credits",
            )
        # Keys are per account: two operators may use the same one.
        payout = await self._store.request(
            owner,
            amount,
            f"payout:{owner}:{idempotency_key}",
            request_fingerprint("payout", owner, amount),
        )
        log.info("payout requested", account_id=account_id, payout_id=str(payout.payout_id))
        return payout

    async def complete(self, caller: Principal, payout_id: str, reference: str) -> Payout:
        return await self._resolve(
            caller, payout_id, PayoutStatus.COMPLETED, reference, field="reference"
        )

    async def reject(self, caller: Principal, payout_id: str, reason: str) -> Payout:
        return await self._resolve(caller, payout_id, PayoutStatus.REJECTED, reason, field="reason")

    async def list_payouts(
        self, caller: Principal, account_id: str, requested_size: int, page_token: str
    ) -> tuple[list[Payout], str]:
        owner = None
        if account_id:
            owner = parse_id(account_id, field="account_id")
            caller.require_access(owner)
        else:
            caller.require_admin()
        limit = page_size(requested_size)
        items = await self._store.list_payouts(owner, limit, decode_cursor(page_token))
        last = items[-1] if len(items) == limit else None
        return items, "" if last is None else encode_cursor(last.requested_at, last.payout_id)

    async def _resolve(
        self, caller: Principal, payout_id: str, outcome: PayoutStatus, note: str, *, field: str
    ) -> Payout:
        caller.require_admin()
        if len(note) > MAX_LINE_TEXT:
            raise InvalidArgument(f"{field} is at most {MAX_LINE_TEXT} characters", field=field)
        payout = await self._store.resolve(parse_id(payout_id, field="payout_id"), outcome, note)
        log.info("payout resolved", payout_id=payout_id, status=payout.status.value)
        return payout
