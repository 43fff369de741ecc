"""Conversions between the account layer's domain types and its protos."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import api_key_service_pb2 as api_key_pb
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import referral_service_pb2 as referral_pb
from resultity.account.v1 import usage_service_pb2 as usage_pb

from core.errors import InvalidArgument
from core.ids import parse_id
from server.account.api_keys import ApiKey, KeyPolicy, Scope
from server.account.ledger import (
    Balance,
    Contribution,
    ContributionTotal,
    Hold,
    HoldStatus,
    SettlementLine,
    SettlementPolicy,
    Transaction,
    TransferKind,
)
from server.account.payouts import Payout, PayoutStatus
from server.account.profiles import Account, Referral, ReferralRules
from server.account.usage import Interval, UsageBucket, UsageRecord
from server.common.inference_logging_proto import logging_to_pb
from server.common.rate_limits_proto import rate_limits_from_pb, rate_limits_to_pb
from server.common.transport import timestamp_to_pb

HOLD_STATUS = {
    HoldStatus.OPEN: ledger_pb.HOLD_STATUS_OPEN,
    HoldStatus.SETTLED: ledger_pb.HOLD_STATUS_SETTLED,
    HoldStatus.RELEASED: ledger_pb.HOLD_STATUS_RELEASED,
}
TRANSFER_KIND = {
    TransferKind.TOP_UP: ledger_pb.TRANSFER_KIND_TOP_UP,
    TransferKind.HOLD: ledger_pb.TRANSFER_KIND_HOLD,
    TransferKind.CAPTURE: ledger_pb.TRANSFER_KIND_CAPTURE,
    TransferKind.GRANT: ledger_pb.TRANSFER_KIND_GRANT,
    TransferKind.PROMO_FUND: ledger_pb.TRANSFER_KIND_PROMOTIONAL_FUNDING,
    TransferKind.REFERRAL_BONUS: ledger_pb.TRANSFER_KIND_REFERRAL_BONUS,
    TransferKind.SUBSCRIPTION_ALLOWANCE: ledger_pb.TRANSFER_KIND_SUBSCRIPTION_ALLOWANCE,
    TransferKind.SUBSCRIPTION_CHARGE: ledger_pb.TRANSFER_KIND_SUBSCRIPTION_CHARGE,
    TransferKind.ALLOWANCE_EXPIRY: ledger_pb.TRANSFER_KIND_ALLOWANCE_EXPIRY,
    TransferKind.PAYOUT: ledger_pb.TRANSFER_KIND_PAYOUT,
}
PAYOUT_STATUS = {
    PayoutStatus.REQUESTED: ledger_pb.PAYOUT_STATUS_REQUESTED,
    PayoutStatus.COMPLETED: ledger_pb.PAYOUT_STATUS_COMPLETED,
    PayoutStatus.REJECTED: ledger_pb.PAYOUT_STATUS_REJECTED,
}
SCOPE_TO_PB = {
    Scope.INFERENCE: api_key_pb.API_KEY_SCOPE_INFERENCE,
    Scope.MANAGEMENT: api_key_pb.API_KEY_SCOPE_MANAGEMENT,
    Scope.ADMIN: api_key_pb.API_KEY_SCOPE_ADMIN,
    Scope.NODE: api_key_pb.API_KEY_SCOPE_NODE,
}
SCOPE_FROM_PB = {value: scope for scope, value in SCOPE_TO_PB.items()}
INTERVAL_TO_PB = {
    Interval.HOUR: usage_pb.USAGE_INTERVAL_HOUR,
    Interval.DAY: usage_pb.USAGE_INTERVAL_DAY,
}
INTERVAL_FROM_PB = {value: interval for interval, value in INTERVAL_TO_PB.items()}


def optional_time(message: object, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    value: Timestamp = getattr(message, field)
    return value.ToDatetime(tzinfo=UTC)


def account(value: Account) -> account_pb.Account:
    result = account_pb.Account(
        account_id=str(value.account_id),
        name=value.name,
        created=timestamp_to_pb(value.created_at),
        email=value.email,
        disabled=value.disabled,
        referred_by_account_id=str(value.referred_by or ""),
        rate_limits=rate_limits_to_pb(value.rate_limits),
        inference_logging=logging_to_pb(value.inference_logging),
    )
    if value.updated_at is not None:
        result.updated.CopyFrom(timestamp_to_pb(value.updated_at))
    return result


def api_key(key: ApiKey) -> api_key_pb.ApiKey:
    result = api_key_pb.ApiKey(
        api_key_id=str(key.api_key_id),
        account_id=str(key.account_id),
        name=key.name,
        prefix=key.prefix,
        created=timestamp_to_pb(key.created_at),
        scopes=sorted(SCOPE_TO_PB[scope] for scope in key.policy.scopes),
        allowed_models=key.policy.allowed_models,
        subcloud_id=key.policy.subcloud_id,
        rate_limits=rate_limits_to_pb(key.policy.rate_limits),
    )
    if key.policy.expires_at is not None:
        result.expires.CopyFrom(timestamp_to_pb(key.policy.expires_at))
    if key.revoked_at is not None:
        result.revoked.CopyFrom(timestamp_to_pb(key.revoked_at))
    return result


def key_policy(request: api_key_pb.CreateApiKeyRequest) -> KeyPolicy:
    scopes = set()
    for value in request.scopes:
        if value not in SCOPE_FROM_PB:
            raise InvalidArgument("unknown scope", field="scopes")
        scopes.add(SCOPE_FROM_PB[value])
    return KeyPolicy(
        scopes=frozenset(scopes),
        expires_at=optional_time(request, "expires"),
        allowed_models=tuple(request.allowed_models),
        subcloud_id=request.subcloud_id,
        rate_limits=rate_limits_from_pb(request.rate_limits),
    )


def balance(value: Balance) -> ledger_pb.Balance:
    return ledger_pb.Balance(
        account_id=str(value.account_id),
        available_micro_credits=value.available,
        held_micro_credits=value.held,
        earned_micro_credits=value.earned,
        payout_pending_micro_credits=value.payout_pending,
    )


def hold(value: Hold) -> ledger_pb.Hold:
    return ledger_pb.Hold(
        hold_id=str(value.hold_id),
        account_id=str(value.account_id),
        amount_micro_credits=value.amount,
        captured_micro_credits=value.captured,
        status=HOLD_STATUS[value.status],
        expires=timestamp_to_pb(value.expires_at),
    )


def transaction(value: Transaction) -> ledger_pb.Transaction:
    return ledger_pb.Transaction(
        transfer_id=str(value.transfer_id),
        kind=TRANSFER_KIND[value.kind],
        amount_micro_credits=value.amount,
        hold_status=(
            HOLD_STATUS[value.hold_status]
            if value.hold_status
            else ledger_pb.HOLD_STATUS_UNSPECIFIED
        ),
        hold_id=str(value.hold_id or ""),
        created=timestamp_to_pb(value.created_at),
        operator_earnings=value.operator_earnings,
    )


def payout(value: Payout) -> ledger_pb.Payout:
    result = ledger_pb.Payout(
        payout_id=str(value.payout_id),
        account_id=str(value.account_id),
        amount_micro_credits=value.amount,
        status=PAYOUT_STATUS[value.status],
        note=value.note,
        requested=timestamp_to_pb(value.requested_at),
    )
    if value.resolved_at is not None:
        result.resolved.CopyFrom(timestamp_to_pb(value.resolved_at))
    return result


def settlement_lines(request: ledger_pb.SettleHoldRequest) -> list[SettlementLine]:
    return [
        SettlementLine(
            operator_account_id=parse_id(line.operator_account_id, field="operator_account_id"),
            node_id=line.node_id,
            model=line.model,
            tokens=line.tokens,
        )
        for line in request.lines
    ]


def policy_to_pb(value: SettlementPolicy) -> contribution_pb.SettlementPolicy:
    result = contribution_pb.SettlementPolicy(
        version=value.version,
        operator_share_basis_points=value.operator_share_bps,
        platform_fee_basis_points=value.platform_fee_bps,
        epoch_seconds=value.epoch_seconds,
        min_payout_micro_credits=value.min_payout,
        max_payout_micro_credits=value.max_payout,
    )
    if value.created_at is not None:
        result.created.CopyFrom(timestamp_to_pb(value.created_at))
    return result


def policy_from_pb(value: contribution_pb.SettlementPolicy) -> SettlementPolicy:
    return SettlementPolicy(
        operator_share_bps=value.operator_share_basis_points,
        platform_fee_bps=value.platform_fee_basis_points,
        epoch_seconds=value.epoch_seconds,
        min_payout=value.min_payout_micro_credits,
        max_payout=value.max_payout_micro_credits,
    )


def contribution(value: Contribution) -> contribution_pb.Contribution:
    return contribution_pb.Contribution(
        contribution_id=str(value.contribution_id),
        operator_account_id=str(value.operator_account_id),
        hold_id=str(value.hold_id),
        node_id=value.node_id,
        model=value.model,
        tokens=value.tokens,
        amount_micro_credits=value.amount,
        created=timestamp_to_pb(value.created_at),
        epoch=value.epoch,
    )


def contribution_total(value: ContributionTotal) -> contribution_pb.ContributionTotal:
    return contribution_pb.ContributionTotal(
        epoch=value.epoch, jobs=value.jobs, tokens=value.tokens, amount_micro_credits=value.amount
    )


def referral(value: Referral) -> referral_pb.Referral:
    return referral_pb.Referral(
        referee_account_id=str(value.referee_account_id),
        created=timestamp_to_pb(value.created_at),
        bonus_paid_micro_credits=value.bonus_paid,
        rewarded_top_ups=value.rewarded_top_ups,
    )


def rules_to_pb(value: ReferralRules) -> referral_pb.ReferralRules:
    return referral_pb.ReferralRules(
        bonus_basis_points=value.bonus_bps,
        rewarded_top_ups=value.rewarded_top_ups,
        max_bonus_micro_credits=value.max_bonus,
    )


def rules_from_pb(value: referral_pb.ReferralRules) -> ReferralRules:
    return ReferralRules(
        value.bonus_basis_points, value.rewarded_top_ups, value.max_bonus_micro_credits
    )


def usage_record(value: UsageRecord) -> usage_pb.UsageRecord:
    return usage_pb.UsageRecord(
        hold_id=str(value.hold_id),
        held_micro_credits=value.held,
        charged_micro_credits=value.charged,
        tokens=value.tokens,
        status=HOLD_STATUS[value.status],
        settled=timestamp_to_pb(value.settled_at),
    )


def usage_bucket(value: UsageBucket) -> usage_pb.UsageBucket:
    return usage_pb.UsageBucket(
        start=timestamp_to_pb(value.start),
        requests=value.requests,
        tokens=value.tokens,
        charged_micro_credits=value.charged,
    )


def usage_interval(value: usage_pb.UsageInterval.ValueType) -> Interval:
    """UNSPECIFIED is an hour."""
    if value == usage_pb.USAGE_INTERVAL_UNSPECIFIED:
        return Interval.HOUR
    try:
        return INTERVAL_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"unknown usage interval {value}", field="interval") from None


def usage_interval_to_pb(value: Interval) -> usage_pb.UsageInterval.ValueType:
    return INTERVAL_TO_PB[value]
