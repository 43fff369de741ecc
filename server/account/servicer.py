"""gRPC servicers of the account server: proto in, one service call, proto out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import (
    account_service_pb2 as account_pb,
)
from resultity.account.v1 import (
    account_service_pb2_grpc as account_grpc,
)
from resultity.account.v1 import (
    api_key_service_pb2 as api_key_pb,
)
from resultity.account.v1 import (
    api_key_service_pb2_grpc as api_key_grpc,
)
from resultity.account.v1 import (
    ledger_service_pb2 as ledger_pb,
)
from resultity.account.v1 import (
    ledger_service_pb2_grpc as ledger_grpc,
)

from server.account.api_keys import ApiKey
from server.account.ledger import Balance, Hold, HoldStatus
from server.account.service import Account, AccountService
from server.common.grpc_errors import translate_errors

Context = grpc.aio.ServicerContext[Any, Any]

_HOLD_STATUS = {
    HoldStatus.OPEN: ledger_pb.HOLD_STATUS_OPEN,
    HoldStatus.SETTLED: ledger_pb.HOLD_STATUS_SETTLED,
    HoldStatus.RELEASED: ledger_pb.HOLD_STATUS_RELEASED,
}


def _timestamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def _account(account: Account) -> account_pb.Account:
    return account_pb.Account(
        account_id=str(account.account_id),
        name=account.name,
        created=_timestamp(account.created_at),
    )


def _api_key(key: ApiKey) -> api_key_pb.ApiKey:
    return api_key_pb.ApiKey(
        api_key_id=str(key.api_key_id),
        account_id=str(key.account_id),
        name=key.name,
        prefix=key.prefix,
        created=_timestamp(key.created_at),
    )


def _balance(balance: Balance) -> ledger_pb.Balance:
    return ledger_pb.Balance(
        account_id=str(balance.account_id),
        available_micro_credits=balance.available,
        held_micro_credits=balance.held,
    )


def _hold(hold: Hold) -> ledger_pb.Hold:
    return ledger_pb.Hold(
        hold_id=str(hold.hold_id),
        account_id=str(hold.account_id),
        amount_micro_credits=hold.amount,
        captured_micro_credits=hold.captured,
        status=_HOLD_STATUS[hold.status],
        expires=_timestamp(hold.expires_at),
    )


class AccountServicer(account_grpc.AccountServiceServicer):
    def __init__(self, service: AccountService) -> None:
        self._service = service

    @translate_errors
    async def CreateAccount(
        self, request: account_pb.CreateAccountRequest, context: Context
    ) -> account_pb.CreateAccountResponse:
        account = await self._service.create_account(request.name)
        return account_pb.CreateAccountResponse(account=_account(account))

    @translate_errors
    async def GetAccount(
        self, request: account_pb.GetAccountRequest, context: Context
    ) -> account_pb.GetAccountResponse:
        account = await self._service.get_account(request.account_id)
        return account_pb.GetAccountResponse(account=_account(account))


class ApiKeyServicer(api_key_grpc.ApiKeyServiceServicer):
    def __init__(self, service: AccountService) -> None:
        self._service = service

    @translate_errors
    async def CreateApiKey(
        self, request: api_key_pb.CreateApiKeyRequest, context: Context
    ) -> api_key_pb.CreateApiKeyResponse:
        issued = await self._service.create_api_key(request.account_id, request.name)
        return api_key_pb.CreateApiKeyResponse(
            api_key=_api_key(issued.api_key), secret=issued.secret
        )

    @translate_errors
    async def AuthenticateApiKey(
        self, request: api_key_pb.AuthenticateApiKeyRequest, context: Context
    ) -> api_key_pb.AuthenticateApiKeyResponse:
        key = await self._service.authenticate_api_key(request.secret)
        return api_key_pb.AuthenticateApiKeyResponse(api_key=_api_key(key))


class LedgerServicer(ledger_grpc.LedgerServiceServicer):
    def __init__(self, service: AccountService) -> None:
        self._service = service

    @translate_errors
    async def TopUp(
        self, request: ledger_pb.TopUpRequest, context: Context
    ) -> ledger_pb.TopUpResponse:
        result = await self._service.top_up(
            request.account_id, request.amount_micro_credits, request.idempotency_key
        )
        return ledger_pb.TopUpResponse(
            transfer_id=str(result.transfer_id), balance=_balance(result.balance)
        )

    @translate_errors
    async def GetBalance(
        self, request: ledger_pb.GetBalanceRequest, context: Context
    ) -> ledger_pb.GetBalanceResponse:
        balance = await self._service.get_balance(request.account_id)
        return ledger_pb.GetBalanceResponse(balance=_balance(balance))

    @translate_errors
    async def CreateHold(
        self, request: ledger_pb.CreateHoldRequest, context: Context
    ) -> ledger_pb.CreateHoldResponse:
        expires = request.expires.ToDatetime(tzinfo=UTC) if request.HasField("expires") else None
        hold = await self._service.create_hold(
            request.account_id, request.amount_micro_credits, request.idempotency_key, expires
        )
        return ledger_pb.CreateHoldResponse(hold=_hold(hold))

    @translate_errors
    async def SettleHold(
        self, request: ledger_pb.SettleHoldRequest, context: Context
    ) -> ledger_pb.SettleHoldResponse:
        hold = await self._service.settle_hold(request.hold_id, request.capture_micro_credits)
        return ledger_pb.SettleHoldResponse(hold=_hold(hold))
