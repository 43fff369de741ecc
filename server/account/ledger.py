"""Ledger domain: amounts, balances, holds and the rules for resolving them.

Amounts are integer micro-credits. The double-entry bookkeeping itself lives
in SQL transactions (ledger_store.py); this module holds the decisions that
do not need the database so that they are stated once and testable alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from server.common.errors import HoldAlreadyResolved, IdempotencyKeyReused, InvalidArgument

MAX_AMOUNT = 2**63 - 1  # PostgreSQL bigint
MAX_IDEMPOTENCY_KEY_LENGTH = 200
BASIS_POINTS = 10_000
MAX_LINE_TEXT = 200


class HoldStatus(StrEnum):
    """State of a hold; the values are the transfer statuses stored in SQL."""

    OPEN = "pending"
    SETTLED = "settled"
    RELEASED = "released"


class TransferKind(StrEnum):
    """Why credits moved; the values are stored in SQL."""

    TOP_UP = "top_up"
    HOLD = "hold"
    CAPTURE = "capture"
    GRANT = "grant"
    PROMO_FUND = "promo_fund"
    REFERRAL_BONUS = "referral_bonus"
    SUBSCRIPTION_ALLOWANCE = "subscription_allowance"


@dataclass(frozen=True)
class Balance:
    account_id: UUID
    available: int
    held: int
    earned: int = 0


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
    referral_bonus: int = 0


@dataclass(frozen=True)
class Transaction:
    """One transfer as one account sees it: positive amounts were credited to it."""

    transfer_id: UUID
    kind: TransferKind
    amount: int
    hold_status: HoldStatus | None
    hold_id: UUID | None
    created_at: datetime
    operator_earnings: bool


@dataclass(frozen=True)
class LedgerSummary:
    cash_in: int
    platform_revenue: int
    promotional_pool: int
    total_debits: int
    total_credits: int


@dataclass(frozen=True)
class SettlementLine:
    """The work of one node operator on the job a hold paid for."""

    operator_account_id: UUID
    node_id: str
    model: str
    tokens: int


@dataclass(frozen=True)
class SettlementPolicy:
    """How a capture is shared; stored as data (table settlement_policy)."""

    operator_share_bps: int
    epoch_seconds: int


@dataclass(frozen=True)
class Contribution:
    contribution_id: UUID
    operator_account_id: UUID
    hold_id: UUID
    node_id: str
    model: str
    tokens: int
    amount: int
    created_at: datetime
    epoch: int


@dataclass(frozen=True)
class ContributionTotal:
    epoch: int  # -1: over all epochs
    jobs: int
    tokens: int
    amount: int


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


def validate_lines(lines: Sequence[SettlementLine]) -> tuple[SettlementLine, ...]:
    operators = [line.operator_account_id for line in lines]
    if len(set(operators)) != len(operators):
        raise InvalidArgument("at most one line per operator", field="lines")
    for line in lines:
        if not 0 <= line.tokens <= MAX_AMOUNT:
            raise InvalidArgument("tokens must not be negative", field="lines")
        if len(line.node_id) > MAX_LINE_TEXT or len(line.model) > MAX_LINE_TEXT:
            raise InvalidArgument("node_id and model are at most 200 characters", field="lines")
    return tuple(lines)


def request_fingerprint(*parts: object) -> str:
    """A digest of a mutation's parameters, stored next to its idempotency key."""
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()


def settle_fingerprint(capture: int, lines: Sequence[SettlementLine]) -> str:
    return request_fingerprint(
        "settle",
        capture,
        *(f"{x.operator_account_id}/{x.node_id}/{x.model}/{x.tokens}" for x in lines),
    )


def ensure_same_request(stored_fingerprint: str, fingerprint: str) -> None:
    if stored_fingerprint != fingerprint:
        raise IdempotencyKeyReused("The idempotency key was already used with different parameters")


def resolve_hold(
    hold: Hold, capture: int, fingerprint: str, stored_fingerprint: str | None
) -> HoldStatus | None:
    """The status settling ``hold`` with ``capture`` leads to.

    None when the hold was already resolved the same way: the call is a
    replay and returns the hold unchanged. A hold the sweeper released has
    no stored fingerprint; releasing it again (capture 0) is a replay.
    """
    if capture > hold.amount:
        raise InvalidArgument(
            f"capture {capture} exceeds the hold amount {hold.amount}",
            field="capture_micro_credits",
        )
    if hold.status is HoldStatus.OPEN:
        return HoldStatus.SETTLED if capture else HoldStatus.RELEASED
    if hold.captured == capture and stored_fingerprint in (None, fingerprint):
        return None
    raise HoldAlreadyResolved(
        f"The hold is already {hold.status.name.lower()} with {hold.captured} captured"
    )


def split_capture(
    capture: int, operator_share_bps: int, tokens: Sequence[int]
) -> tuple[list[int], int]:
    """Each operator's part of ``capture`` and the platform's.

    The operators' share is split by tokens, rounding down; the platform gets
    the rest, so the parts always add up to the capture exactly. Without
    lines (or tokens) the platform gets everything.
    """
    total_tokens = sum(tokens)
    if capture == 0 or total_tokens == 0:
        return [0] * len(tokens), capture
    operators = capture * operator_share_bps // BASIS_POINTS
    parts = [operators * count // total_tokens for count in tokens]
    return parts, capture - sum(parts)


def referral_bonus(
    top_up: int,
    *,
    bonus_bps: int,
    rewarded_top_ups: int,
    max_bonus: int,
    prior_top_ups: int,
    paid_so_far: int,
) -> int:
    """The bonus a referee's top-up earns the referrer under the stored rules."""
    if prior_top_ups >= rewarded_top_ups:
        return 0
    return max(0, min(top_up * bonus_bps // BASIS_POINTS, max_bonus - paid_so_far))
