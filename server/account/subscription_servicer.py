"""gRPC servicer of SubscriptionService: proto in, one service call, proto out."""

from __future__ import annotations

from resultity.account.v1 import subscription_service_pb2 as sub_pb
from resultity.account.v1 import subscription_service_pb2_grpc as sub_grpc

from core.grpc_errors import translate_errors
from server.account.service import AccountService
from server.account.subscriptions import (
    Plan,
    Subscription,
    SubscriptionService,
    SubscriptionStatus,
)
from server.common.transport import Context, authorization, timestamp_to_pb

_STATUS = {
    SubscriptionStatus.ACTIVE: sub_pb.SUBSCRIPTION_STATUS_ACTIVE,
    SubscriptionStatus.CANCELLED: sub_pb.SUBSCRIPTION_STATUS_CANCELLED,
    SubscriptionStatus.LAPSED: sub_pb.SUBSCRIPTION_STATUS_LAPSED,
}


def _plan(plan: Plan) -> sub_pb.Plan:
    return sub_pb.Plan(
        plan_id=str(plan.plan_id),
        name=plan.name,
        monthly_price_micro_credits=plan.monthly_price,
        monthly_allowance_micro_credits=plan.monthly_allowance,
        created=timestamp_to_pb(plan.created_at),
    )


def _subscription(value: Subscription) -> sub_pb.Subscription:
    start, end = value.current_period
    return sub_pb.Subscription(
        subscription_id=str(value.subscription_id),
        account_id=str(value.account_id),
        plan_id=str(value.plan_id),
        status=_STATUS[value.status],
        started=timestamp_to_pb(value.started_at),
        current_period_start=timestamp_to_pb(start),
        current_period_end=timestamp_to_pb(end),
        periods_granted=value.periods_granted,
    )


class SubscriptionServicer(sub_grpc.SubscriptionServiceServicer):
    def __init__(self, accounts: AccountService, subscriptions: SubscriptionService) -> None:
        self._accounts = accounts
        self._subscriptions = subscriptions

    @translate_errors
    async def CreatePlan(
        self, request: sub_pb.CreatePlanRequest, context: Context
    ) -> sub_pb.CreatePlanResponse:
        plan = await self._subscriptions.create_plan(
            await self._accounts.principal(authorization(context)),
            request.name,
            request.monthly_price_micro_credits,
            request.monthly_allowance_micro_credits,
        )
        return sub_pb.CreatePlanResponse(plan=_plan(plan))

    @translate_errors
    async def ListPlans(
        self, request: sub_pb.ListPlansRequest, context: Context
    ) -> sub_pb.ListPlansResponse:
        plans = await self._subscriptions.list_plans(
            await self._accounts.principal(authorization(context))
        )
        return sub_pb.ListPlansResponse(plans=[_plan(p) for p in plans])

    @translate_errors
    async def Subscribe(
        self, request: sub_pb.SubscribeRequest, context: Context
    ) -> sub_pb.SubscribeResponse:
        subscription = await self._subscriptions.subscribe(
            await self._accounts.principal(authorization(context)),
            request.account_id,
            request.plan_id,
        )
        return sub_pb.SubscribeResponse(subscription=_subscription(subscription))

    @translate_errors
    async def GetSubscription(
        self, request: sub_pb.GetSubscriptionRequest, context: Context
    ) -> sub_pb.GetSubscriptionResponse:
        subscription = await self._subscriptions.get_active(
            await self._accounts.principal(authorization(context)), request.account_id
        )
        return sub_pb.GetSubscriptionResponse(subscription=_subscription(subscription))

    @translate_errors
    async def ListSubscriptions(
        self, request: sub_pb.ListSubscriptionsRequest, context: Context
    ) -> sub_pb.ListSubscriptionsResponse:
        items, token = await self._subscriptions.list_subscriptions(
            await self._accounts.principal(authorization(context)),
            request.account_id,
            request.page_size,
            request.page_token,
        )
        return sub_pb.ListSubscriptionsResponse(
            subscriptions=[_subscription(s) for s in items], next_page_token=token
        )

    @translate_errors
    async def CancelSubscription(
        self, request: sub_pb.CancelSubscriptionRequest, context: Context
    ) -> sub_pb.CancelSubscriptionResponse:
        subscription = await self._subscriptions.cancel(
            await self._accounts.principal(authorization(context)), request.subscription_id
        )
        return sub_pb.CancelSubscriptionResponse(subscription=_subscription(subscription))

    @translate_errors
    async def RenewSubscriptions(
        self, request: sub_pb.RenewSubscriptionsRequest, context: Context
    ) -> sub_pb.RenewSubscriptionsResponse:
        report = await self._subscriptions.renew(
            await self._accounts.principal(authorization(context))
        )
        return sub_pb.RenewSubscriptionsResponse(
            granted=report.granted,
            lapsed=report.lapsed,
            expired_periods=report.expired_periods,
            returned_micro_credits=report.returned,
        )
