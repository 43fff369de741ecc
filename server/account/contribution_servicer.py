"""gRPC servicer of ContributionService: proto in, one service call, proto out."""

from __future__ import annotations

from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import contribution_service_pb2_grpc as contribution_grpc

from core.grpc_errors import translate_errors
from server.account import convert
from server.account.authz import Principal
from server.account.contributions import ContributionService
from server.account.earnings import OperatorEarnings
from server.account.service import AccountService
from server.common.transport import Context, authorization


class ContributionServicer(contribution_grpc.ContributionServiceServicer):
    def __init__(
        self,
        accounts: AccountService,
        contributions: ContributionService,
        earnings: OperatorEarnings,
    ) -> None:
        self._accounts = accounts
        self._contributions = contributions
        self._earnings = earnings

    async def _caller(self, context: Context) -> Principal:
        return await self._accounts.principal(authorization(context))

    @translate_errors
    async def ListContributions(
        self, request: contribution_pb.ListContributionsRequest, context: Context
    ) -> contribution_pb.ListContributionsResponse:
        items, token = await self._contributions.list_contributions(
            await self._caller(context),
            request.operator_account_id,
            request.page_size,
            request.page_token,
        )
        return contribution_pb.ListContributionsResponse(
            contributions=[convert.contribution(c) for c in items], next_page_token=token
        )

    @translate_errors
    async def GetContributionTotals(
        self, request: contribution_pb.GetContributionTotalsRequest, context: Context
    ) -> contribution_pb.GetContributionTotalsResponse:
        overall, epochs, epoch_seconds = await self._contributions.contribution_totals(
            await self._caller(context), request.operator_account_id, request.epochs
        )
        return contribution_pb.GetContributionTotalsResponse(
            overall=convert.contribution_total(overall),
            epochs=[convert.contribution_total(e) for e in epochs],
            epoch_seconds=epoch_seconds,
        )

    @translate_errors
    async def GetOperatorEarnings(
        self, request: contribution_pb.GetOperatorEarningsRequest, context: Context
    ) -> contribution_pb.GetOperatorEarningsResponse:
        epochs = await self._earnings.operator_earnings(
            await self._caller(context), request.operator_account_id, request.epochs
        )
        return contribution_pb.GetOperatorEarningsResponse(
            epochs=[convert.contribution_total(e) for e in epochs]
        )

    @translate_errors
    async def GetSettlementPolicy(
        self, request: contribution_pb.GetSettlementPolicyRequest, context: Context
    ) -> contribution_pb.GetSettlementPolicyResponse:
        policy = await self._contributions.settlement_policy(await self._caller(context))
        return contribution_pb.GetSettlementPolicyResponse(policy=convert.policy_to_pb(policy))

    @translate_errors
    async def UpdateSettlementPolicy(
        self, request: contribution_pb.UpdateSettlementPolicyRequest, context: Context
    ) -> contribution_pb.UpdateSettlementPolicyResponse:
        policy = await self._contributions.update_settlement_policy(
            await self._caller(context), convert.policy_from_pb(request.policy)
        )
        return contribution_pb.UpdateSettlementPolicyResponse(policy=convert.policy_to_pb(policy))
