"""Operator payouts over real gRPC: reserve earnings, complete through cash-out or reject."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import api_key_service_pb2 as key_pb
from resultity.account.v1 import ledger_service_pb2 as ledger_pb

from tests.account_support import Stubs, earn, expect_error
from tests.harness import Platform, running_platform

Code = grpc.StatusCode
CREDIT = 1_000_000


@pytest.fixture(scope="module")
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


async def _account(platform: Platform, stubs: Stubs) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A new account and the metadata of its own management key."""
    account = (
        await stubs.accounts.CreateAccount(
            account_pb.CreateAccountRequest(name="operator"), metadata=platform.service
        )
    ).account.account_id
    key = await stubs.keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(account_id=account, scopes=[key_pb.API_KEY_SCOPE_MANAGEMENT]),
        metadata=platform.service,
    )
    return account, (("authorization", f"Bearer {key.secret}"),)


async def test_a_payout_is_reserved_then_paid_out_or_released(platform: Platform) -> None:
    stubs = Stubs.on(platform.channel)
    operator, own = await _account(platform, stubs)
    await earn(stubs, platform.service, operator, 5 * CREDIT)  # 80%: 4 credits earned

    async def balance() -> tuple[int, int]:
        got = await stubs.ledger.GetBalance(
            ledger_pb.GetBalanceRequest(account_id=operator), metadata=own
        )
        return got.balance.earned_micro_credits, got.balance.payout_pending_micro_credits

    def request(amount: int, key: str) -> ledger_pb.RequestPayoutRequest:
        return ledger_pb.RequestPayoutRequest(
            account_id=operator, amount_micro_credits=amount, idempotency_key=key
        )

    await expect_error(
        stubs.ledger.RequestPayout(request(CREDIT // 2, "small"), metadata=own),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stubs.ledger.RequestPayout(request(5 * CREDIT, "large"), metadata=own),
        Code.RESOURCE_EXHAUSTED,
        "INSUFFICIENT_QUOTA",
    )
    first = (await stubs.ledger.RequestPayout(request(3 * CREDIT // 2, "p1"), metadata=own)).payout
    assert first.status == ledger_pb.PAYOUT_STATUS_REQUESTED
    replay = (await stubs.ledger.RequestPayout(request(3 * CREDIT // 2, "p1"), metadata=own)).payout
    assert replay.payout_id == first.payout_id
    await expect_error(
        stubs.ledger.RequestPayout(request(CREDIT, "p1"), metadata=own),
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert await balance() == (4 * CREDIT - 3 * CREDIT // 2, 3 * CREDIT // 2)

    # Only an admin resolves a payout.
    complete = ledger_pb.CompletePayoutRequest(payout_id=first.payout_id, reference="wire 42")
    await expect_error(
        stubs.ledger.CompletePayout(complete, metadata=own),
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    cash_out = (
        await stubs.ledger.GetLedgerSummary(
            ledger_pb.GetLedgerSummaryRequest(), metadata=platform.service
        )
    ).cash_out_micro_credits
    paid = (await stubs.ledger.CompletePayout(complete, metadata=platform.service)).payout
    assert (paid.status, paid.note, paid.HasField("resolved")) == (
        ledger_pb.PAYOUT_STATUS_COMPLETED,
        "wire 42",
        True,
    )
    again = (await stubs.ledger.CompletePayout(complete, metadata=platform.service)).payout
    assert again == paid
    await expect_error(
        stubs.ledger.RejectPayout(
            ledger_pb.RejectPayoutRequest(payout_id=first.payout_id), metadata=platform.service
        ),
        Code.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
    )
    summary = await stubs.ledger.GetLedgerSummary(
        ledger_pb.GetLedgerSummaryRequest(), metadata=platform.service
    )
    assert summary.cash_out_micro_credits - cash_out == 3 * CREDIT // 2
    assert summary.total_debits_micro_credits == summary.total_credits_micro_credits
    assert await balance() == (4 * CREDIT - 3 * CREDIT // 2, 0)

    second = (await stubs.ledger.RequestPayout(request(2 * CREDIT, "p2"), metadata=own)).payout
    rejected = (
        await stubs.ledger.RejectPayout(
            ledger_pb.RejectPayoutRequest(payout_id=second.payout_id, reason="unverified"),
            metadata=platform.service,
        )
    ).payout
    assert rejected.status == ledger_pb.PAYOUT_STATUS_REJECTED
    assert await balance() == (4 * CREDIT - 3 * CREDIT // 2, 0)

    # Newest first, page by page; everyone's only for an admin.
    page = await stubs.ledger.ListPayouts(
        ledger_pb.ListPayoutsRequest(account_id=operator, page_size=1), metadata=own
    )
    rest = await stubs.ledger.ListPayouts(
        ledger_pb.ListPayoutsRequest(
            account_id=operator, page_size=1, page_token=page.next_page_token
        ),
        metadata=own,
    )
    assert [p.payout_id for p in [*page.payouts, *rest.payouts]] == [
        second.payout_id,
        first.payout_id,
    ]
    await expect_error(
        stubs.ledger.ListPayouts(ledger_pb.ListPayoutsRequest(), metadata=own),
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    everyone = await stubs.ledger.ListPayouts(
        ledger_pb.ListPayoutsRequest(page_size=100), metadata=platform.service
    )
    assert {first.payout_id, second.payout_id} <= {p.payout_id for p in everyone.payouts}
    history = await stubs.ledger.ListTransactions(
        ledger_pb.ListTransactionsRequest(account_id=operator), metadata=own
    )
    assert [(t.kind, t.amount_micro_credits, t.hold_status) for t in history.transactions][:2] == [
        (ledger_pb.TRANSFER_KIND_PAYOUT, -2 * CREDIT, ledger_pb.HOLD_STATUS_RELEASED),
        (ledger_pb.TRANSFER_KIND_CAPTURE, -3 * CREDIT // 2, ledger_pb.HOLD_STATUS_UNSPECIFIED),
    ]


async def test_only_the_operator_or_an_admin_requests_its_payout(platform: Platform) -> None:
    stubs = Stubs.on(platform.channel)
    operator, _ = await _account(platform, stubs)
    _, stranger = await _account(platform, stubs)
    await expect_error(
        stubs.ledger.RequestPayout(
            ledger_pb.RequestPayoutRequest(
                account_id=operator, amount_micro_credits=CREDIT, idempotency_key="k"
            ),
            metadata=stranger,
        ),
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
