"""gRPC servicer of UsageService: proto in, one service call, proto out."""

from __future__ import annotations

from resultity.account.v1 import usage_service_pb2 as usage_pb
from resultity.account.v1 import usage_service_pb2_grpc as usage_grpc

from core.grpc_errors import translate_errors
from server.account import convert
from server.account.service import AccountService
from server.account.usage import ConsumerUsage
from server.common.transport import Context, authorization


class UsageServicer(usage_grpc.UsageServiceServicer):
    def __init__(self, accounts: AccountService, usage: ConsumerUsage) -> None:
        self._accounts = accounts
        self._usage = usage

    @translate_errors
    async def ListUsageRecords(
        self, request: usage_pb.ListUsageRecordsRequest, context: Context
    ) -> usage_pb.ListUsageRecordsResponse:
        records, token = await self._usage.records(
            await self._accounts.principal(authorization(context)),
            request.account_id,
            request.page_size,
            request.page_token,
        )
        return usage_pb.ListUsageRecordsResponse(
            records=[convert.usage_record(r) for r in records], next_page_token=token
        )

    @translate_errors
    async def GetUsageHistory(
        self, request: usage_pb.GetUsageHistoryRequest, context: Context
    ) -> usage_pb.GetUsageHistoryResponse:
        interval = convert.usage_interval(request.interval)
        buckets = await self._usage.history(
            await self._accounts.principal(authorization(context)),
            request.account_id,
            interval,
            request.intervals,
        )
        return usage_pb.GetUsageHistoryResponse(
            interval=convert.usage_interval_to_pb(interval),
            buckets=[convert.usage_bucket(b) for b in buckets],
        )
