"""Ledger domain: amounts, balances, holds and the rules for resolving them.

Amounts are integer micro-credits. The double-entry bookkeeping itself lives
in SQL transactions (store.py); this module holds the decisions that do not
need the database so that they are stated once and testable alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from server.common.errors import HoldAlreadyResolved, IdempotencyKeyReused, InvalidArgument

MAX_AMOUNT = 2**63 - 1  # PostgreSQL bigint
MAX_IDEMPOTENCY_KEY_LENGTH = 200


class HoldStatus(StrEnum):
    """State of a hold; the values are the transfer statuses stored in SQL."""

    OPEN = "pending"
    SETTLED = "settled"
    RELEASED = "released"


@dataclass(frozen=True)
class Balance:
    account_id: UUID
    available: int
    held: int


@dataclass(frozen=True)
class Hold:
    hold_id: UUID
    account_id: UUID
    amount: int
    captured: int
    status: HoldStatus
    expires_at: datetime


@dataclass(frozen=True)
class TopUpResult:
    transfer_id: UUID
    balance: Balance


def validate_amount(amount: int, *, field: str) -> int:
    if not 0 < amount <= MAX_AMOUNT:
        raise InvalidArgument(f"{field} must be a positive number of micro-credits", field=field)
    return amount


def validate_capture(capture: int, *, field: str) -> int:
    if not 0 <= capture <= MAX_AMOUNT:
        raise InvalidArgument(f"{field} must not be negative", field=field)
    return capture


def validate_idempotency_key(key: str, *, field: str = "idempotency_key") -> str:
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidArgument(
            f"{field} is required (at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters)", field=field
        )
    return key


def request_fingerprint(*parts: object) -> str:
    """A digest of a mutation's parameters, stored next to its idempotency key."""
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()


def ensure_same_request(stored_fingerprint: str, fingerprint: str) -> None:
    if stored_fingerprint != fingerprint:
        raise IdempotencyKeyReused("The idempotency key was already used with different parameters")


def resolve_hold(hold: Hold, capture: int) -> HoldStatus | None:
    """The status settling ``hold`` with ``capture`` leads to.

    None when the hold was already resolved with the same capture: the call is
    a replay and returns the hold unchanged.
    """
    if capture > hold.amount:
        raise InvalidArgument(
            f"capture {capture} exceeds the hold amount {hold.amount}",
            field="capture_micro_credits",
        )
    if hold.status is HoldStatus.OPEN:
        return HoldStatus.SETTLED if capture else HoldStatus.RELEASED
    if hold.captured == capture:
        return None
    raise HoldAlreadyResolved(
        f"The hold is already {hold.status.name.lower()} with {hold.captured} captured"
    )
