"""Helpers for tests of the account layer over real gRPC."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2_grpc as api_key_grpc
from resultity.account.v1 import contribution_service_pb2_grpc as contribution_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import referral_service_pb2_grpc as referral_grpc
from resultity.account.v1 import subscription_service_pb2_grpc as subscription_grpc

from core.grpc_errors import error_info

Metadata = tuple[tuple[str, str], ...]


class _WithCredential(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``authorization: Bearer <credential>`` to calls that carry none."""

    def __init__(self, credential: str) -> None:
        self._header = ("authorization", f"Bearer {credential}")

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(self._header)
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return await continuation(details, request)


def channel_as(target: str, credential: str | None) -> grpc.aio.Channel:
    """A channel whose calls authenticate with ``credential`` (none if None)."""
    interceptors = [] if credential is None else [_WithCredential(credential)]
    return grpc.aio.insecure_channel(target, interceptors=interceptors)


@dataclass
class Stubs:
    accounts: account_grpc.AccountServiceAsyncStub
    keys: api_key_grpc.ApiKeyServiceAsyncStub
    ledger: ledger_grpc.LedgerServiceAsyncStub
    referrals: referral_grpc.ReferralServiceAsyncStub
    contributions: contribution_grpc.ContributionServiceAsyncStub
    subscriptions: subscription_grpc.SubscriptionServiceAsyncStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> Stubs:
        return cls(
            account_grpc.AccountServiceStub(channel),
            api_key_grpc.ApiKeyServiceStub(channel),
            ledger_grpc.LedgerServiceStub(channel),
            referral_grpc.ReferralServiceStub(channel),
            contribution_grpc.ContributionServiceStub(channel),
            subscription_grpc.SubscriptionServiceStub(channel),
        )


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == reason
    return info


async def earn(stubs: Stubs, service: Metadata, operator: str, capture: int) -> None:
    """Credits ``operator`` its share of a new consumer's job settled for ``capture``."""
    consumer = (
        await stubs.accounts.CreateAccount(
            account_pb.CreateAccountRequest(name="consumer"), metadata=service
        )
    ).account.account_id
    await stubs.ledger.TopUp(
        ledger_pb.TopUpRequest(
            account_id=consumer, amount_micro_credits=capture, idempotency_key=uuid.uuid4().hex
        ),
        metadata=service,
    )
    hold = await stubs.ledger.CreateHold(
        ledger_pb.CreateHoldRequest(
            account_id=consumer, amount_micro_credits=capture, idempotency_key=uuid.uuid4().hex
        ),
        metadata=service,
    )
    line = ledger_pb.SettlementLine(operator_account_id=operator, node_id="n", model="m", tokens=9)
    await stubs.ledger.SettleHold(
        ledger_pb.SettleHoldRequest(
            hold_id=hold.hold.hold_id, capture_micro_credits=capture, lines=[line]
        ),
        metadata=service,
    )
