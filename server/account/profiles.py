"""Accounts, profiles and referrals: the records and the rules for their fields."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from core.errors import InvalidArgument
from server.account.ledger import BASIS_POINTS, MAX_AMOUNT
from server.common.inference_logging import LOGGING_OFF, InferenceLogging
from server.common.rate_limits import NO_LIMITS, RateLimits

MAX_NAME_LENGTH = 200
MAX_EMAIL_LENGTH = 254
REFERRAL_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
REFERRAL_CODE_LENGTH = 10


@dataclass(frozen=True)
class Account:
    account_id: UUID
    name: str
    created_at: datetime
    disabled: bool = False
    email: str = ""
    referred_by: UUID | None = None
    updated_at: datetime | None = None
    rate_limits: RateLimits = NO_LIMITS
    inference_logging: InferenceLogging = LOGGING_OFF


@dataclass(frozen=True)
class Referral:
    referee_account_id: UUID
    created_at: datetime
    bonus_paid: int
    rewarded_top_ups: int


@dataclass(frozen=True)
class ReferralRules:
    """A share of the referee's first top-ups, capped; paid from the promotional pool."""

    bonus_bps: int
    rewarded_top_ups: int
    max_bonus: int


def validate_name(name: str, *, field: str = "name", required: bool = True) -> str:
    name = name.strip()
    if (required and not name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"{field} must be {'1' if required else '0'} to {MAX_NAME_LENGTH} characters",
            field=field,
        )
    return name


def validate_email(email: str) -> str:
    email = email.strip()
    if email and (len(email) > MAX_EMAIL_LENGTH or "@" not in email[1:-1]):
        raise InvalidArgument("email is not an email address", field="email")
    return email


def validate_rules(rules: ReferralRules) -> ReferralRules:
    if not 0 <= rules.bonus_bps <= BASIS_POINTS:
        raise InvalidArgument("bonus_basis_points must be 0 to 10000", field="rules")
    if rules.rewarded_top_ups < 0 or not 0 <= rules.max_bonus <= MAX_AMOUNT:
        raise InvalidArgument("rewarded_top_ups and the cap must not be negative", field="rules")
    return rules


def new_referral_code() -> str:
    return "".join(secrets.choice(REFERRAL_CODE_ALPHABET) for _ in range(REFERRAL_CODE_LENGTH))
