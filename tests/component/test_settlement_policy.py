"""The settlement policy over real gRPC: versioned, admin-only, validated, applied at once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import api_key_service_pb2 as key_pb
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import ledger_service_pb2 as ledger_pb

from tests.account_support import Stubs, expect_error
from tests.harness import Platform, running_platform

Code = grpc.StatusCode


@pytest.fixture(scope="module")
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


async def _account(platform: Platform, stubs: Stubs, credits: int = 0) -> str:
    account = (
        await stubs.accounts.CreateAccount(
            account_pb.CreateAccountRequest(name="x"), metadata=platform.service
        )
    ).account.account_id
    if credits:
        await stubs.ledger.TopUp(
            ledger_pb.TopUpRequest(
                account_id=account, amount_micro_credits=credits, idempotency_key=uuid.uuid4().hex
            ),
            metadata=platform.service,
        )
    return account


async def test_an_updated_policy_is_a_new_version_applied_to_the_next_settlement(
    platform: Platform,
) -> None:
    stubs = Stubs.on(platform.channel)
    user = await _account(platform, stubs)
    key = await stubs.keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(account_id=user, scopes=[key_pb.API_KEY_SCOPE_MANAGEMENT]),
        metadata=platform.service,
    )
    own = (("authorization", f"Bearer {key.secret}"),)
    # Anyone authenticated reads it; only an admin changes it.
    current = (
        await stubs.contributions.GetSettlementPolicy(
            contribution_pb.GetSettlementPolicyRequest(), metadata=own
        )
    ).policy
    assert current.operator_share_basis_points + current.platform_fee_basis_points == 10_000
    proposed = contribution_pb.SettlementPolicy(
        operator_share_basis_points=6_000,
        platform_fee_basis_points=4_000,
        epoch_seconds=3_600,
        min_payout_micro_credits=10,
        max_payout_micro_credits=1_000,
    )
    update = contribution_pb.UpdateSettlementPolicyRequest(policy=proposed)
    await expect_error(
        stubs.contributions.UpdateSettlementPolicy(update, metadata=own),
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    for field, value in (
        ("platform_fee_basis_points", 3_000),
        ("epoch_seconds", 0),
        ("min_payout_micro_credits", 2_000),
    ):
        bad = contribution_pb.SettlementPolicy()
        bad.CopyFrom(proposed)
        setattr(bad, field, value)
        await expect_error(
            stubs.contributions.UpdateSettlementPolicy(
                contribution_pb.UpdateSettlementPolicyRequest(policy=bad),
                metadata=platform.service,
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )

    try:
        stored = (
            await stubs.contributions.UpdateSettlementPolicy(update, metadata=platform.service)
        ).policy
        assert stored.version == current.version + 1
        assert stored.HasField("created")
        got = await stubs.contributions.GetSettlementPolicy(
            contribution_pb.GetSettlementPolicyRequest(), metadata=own
        )
        assert got.policy == stored

        consumer = await _account(platform, stubs, 10_000)
        operator = await _account(platform, stubs)
        hold = await stubs.ledger.CreateHold(
            ledger_pb.CreateHoldRequest(
                account_id=consumer, amount_micro_credits=10_000, idempotency_key=uuid.uuid4().hex
            ),
            metadata=platform.service,
        )
        line = ledger_pb.SettlementLine(operator_account_id=operator, node_id="n", tokens=5)
        await stubs.ledger.SettleHold(
            ledger_pb.SettleHoldRequest(
                hold_id=hold.hold.hold_id, capture_micro_credits=1_001, lines=[line]
            ),
            metadata=platform.service,
        )
        earned = await stubs.ledger.GetBalance(
            ledger_pb.GetBalanceRequest(account_id=operator), metadata=platform.service
        )
        assert earned.balance.earned_micro_credits == 1_001 * 6_000 // 10_000
        # The new payout bounds apply too.
        await expect_error(
            stubs.ledger.RequestPayout(
                ledger_pb.RequestPayoutRequest(
                    account_id=operator, amount_micro_credits=1_001, idempotency_key="k"
                ),
                metadata=platform.service,
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
    finally:
        # The database is shared with other tests: put the policy back (as a new version).
        await stubs.contributions.UpdateSettlementPolicy(
            contribution_pb.UpdateSettlementPolicyRequest(policy=current),
            metadata=platform.service,
        )
