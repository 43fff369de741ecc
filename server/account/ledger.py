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

from core.errors import HoldAlreadyResolved, IdempotencyKeyReused, InvalidArgument

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
    SUBSCRIPTION_CHARGE = "subscription_charge"
    ALLOWANCE_EXPIRY = "allowance_expiry"
    PAYOUT = "payout"


@dataclass(frozen=True)
class Balance:
    account_id: UUID
    available: int
    held: int
    # Operator earnings not paid out or reserved, and those reserved by payouts.
    earned: int = 0
    payout_pending: int = 0


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
    cash_out: int = 0


@dataclass(frozen=True)
class SettlementLine:
    """The work of one node operator on the job a hold paid for."""

    operator_account_id: UUID
    node_id: str
    model: str
    tokens: int


@dataclass(frozen=True)
class SettlementPolicy:
    """How captures are shared and operators paid; stored as data, versioned
    (table settlement_policies: the newest version applies)."""

    operator_share_bps: int
    platform_fee_bps: int
    epoch_seconds: int
    # Bounds of one payout's amount.
    min_payout: int
    max_payout: int
    version: int = 0  # 0: not stored yet
    created_at: datetime | None = None


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


MAX_EPOCH_SECONDS = 366 * 86_400


def validate_policy(policy: SettlementPolicy) -> SettlementPolicy:
    """A policy to store: shares in basis points adding up to the whole, sane bounds."""
    if not (
        0 <= policy.operator_share_bps <= BASIS_POINTS
        and 0 <= policy.platform_fee_bps <= BASIS_POINTS
        and policy.operator_share_bps + policy.platform_fee_bps == BASIS_POINTS
    ):
        raise InvalidArgument(
            f"the operators' share and the platform fee must add up to {BASIS_POINTS} basis points",
            field="policy.operator_share_basis_points",
        )
    if not 0 < policy.epoch_seconds <= MAX_EPOCH_SECONDS:
        raise InvalidArgument(
            f"epoch_seconds must be 1 to {MAX_EPOCH_SECONDS}", field="policy.epoch_seconds"
        )
    if not 0 < policy.min_payout <= policy.max_payout <= MAX_AMOUNT:
        raise InvalidArgument(
            "payout bounds must satisfy 0 < min_payout <= max_payout",
            field="policy.min_payout_micro_credits",
        )
    return policy


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


def validate_lines(
    lines: Sequence[SettlementLine], total_tokens: int
) -> tuple[tuple[SettlementLine, ...], int]:
    """The lines, and the tokens the capture pays for (0: the lines' sum)."""
    operators = [line.operator_account_id for line in lines]
    if len(set(operators)) != len(operators):
        raise InvalidArgument("at most one line per operator", field="lines")
    for line in lines:
        if not 0 <= line.tokens <= MAX_AMOUNT:
            raise InvalidArgument("tokens must not be negative", field="lines")
        if len(line.node_id) > MAX_LINE_TEXT or len(line.model) > MAX_LINE_TEXT:
            raise InvalidArgument("node_id and model are at most 200 characters", field="lines")
    claimed = sum(line.tokens for line in lines)
    if total_tokens == 0:
        return tuple(lines), claimed
    if not claimed <= total_tokens <= MAX_AMOUNT:
        raise InvalidArgument(
            f"total_tokens must be at least the lines' {claimed} tokens", field="total_tokens"
        )
    return tuple(lines), total_tokens


def request_fingerprint(*parts: object) -> str:
    """A digest of a mutation's parameters, stored next to its idempotency key."""
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()


def settle_fingerprint(capture: int, lines: Sequence[SettlementLine], total_tokens: int) -> str:
    parts: list[object] = [
        "settle",
        capture,
        *(f"{x.operator_account_id}/{x.node_id}/{x.model}/{x.tokens}" for x in lines),
    ]
    # Settlements whose lines cover every token keep the digest they had
    # before total_tokens existed, so their replays still match.
    if total_tokens != sum(x.tokens for x in lines):
        parts.append(f"total/{total_tokens}")
    return request_fingerprint(*parts)


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
    capture: int, operator_share_bps: int, tokens: Sequence[int], total_tokens: int
) -> tuple[list[int], int]:
    """Each operator's part of ``capture`` and the platform's.

    The operators' share of the capture is divided by ``total_tokens``: each
    line earns its tokens' part, rounded down. The platform gets the rest:
    its fee, the rounding remainders and the part of tokens no line claims
    (``total_tokens`` - sum(``tokens``)), so the parts add up to the capture
    exactly. Without tokens the platform gets everything.
    """
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
