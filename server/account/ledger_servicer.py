"""gRPC servicer of LedgerService: proto in, one service call, proto out.

CreateHolds and SettleHolds make, for each item, the call CreateHold and SettleHold
make (concurrently: the hold store commits them in groups); an item's error becomes
its status (core/batch_calls.py)."""

from __future__ import annotations

import google.rpc.status_pb2 as status_pb2
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc

from core.batch_calls import check_items, item_outcomes
from core.grpc_errors import translate_errors
from server.account import convert
from server.account.authz import Principal
from server.account.billing import BillingService
from server.account.payouts import PayoutService
from server.account.service import AccountService
from server.account.servicer import CallerBase
from server.common.transport import Context


class LedgerServicer(CallerBase, ledger_grpc.LedgerServiceServicer):
    def __init__(
        self, accounts: AccountService, billing: BillingService, payouts: PayoutService
    ) -> None:
        super().__init__(accounts, billing)
        self._payouts = payouts

    @translate_errors
    async def TopUp(
        self, request: ledger_pb.TopUpRequest, context: Context
    ) -> ledger_pb.TopUpResponse:
        result = await self._billing.top_up(
            await self._caller(context),
            request.account_id,
            request.amount_micro_credits,
            request.idempotency_key,
        )
        return ledger_pb.TopUpResponse(
            transfer_id=str(result.transfer_id),
            balance=convert.balance(result.balance),
            referral_bonus_micro_credits=result.referral_bonus,
        )

    @translate_errors
    async def GrantCredits(
        self, request: ledger_pb.GrantCreditsRequest, context: Context
    ) -> ledger_pb.GrantCreditsResponse:
        result = await self._billing.grant(
            await self._caller(context),
            request.account_id,
            request.amount_micro_credits,
            request.idempotency_key,
        )
        return ledger_pb.GrantCreditsResponse(
            transfer_id=str(result.transfer_id), balance=convert.balance(result.balance)
        )

    @translate_errors
    async def FundPromotionalPool(
        self, request: ledger_pb.FundPromotionalPoolRequest, context: Context
    ) -> ledger_pb.FundPromotionalPoolResponse:
        transfer_id, available = await self._billing.fund_promotional_pool(
            await self._caller(context), request.amount_micro_credits, request.idempotency_key
        )
        return ledger_pb.FundPromotionalPoolResponse(
            transfer_id=str(transfer_id), available_micro_credits=available
        )

    @translate_errors
    async def GetBalance(
        self, request: ledger_pb.GetBalanceRequest, context: Context
    ) -> ledger_pb.GetBalanceResponse:
        balance = await self._billing.get_balance(await self._caller(context), request.account_id)
        return ledger_pb.GetBalanceResponse(balance=convert.balance(balance))

    @translate_errors
    async def ListTransactions(
        self, request: ledger_pb.ListTransactionsRequest, context: Context
    ) -> ledger_pb.ListTransactionsResponse:
        items, token = await self._billing.list_transactions(
            await self._caller(context), request.account_id, request.page_size, request.page_token
        )
        return ledger_pb.ListTransactionsResponse(
            transactions=[convert.transaction(t) for t in items], next_page_token=token
        )

    @translate_errors
    async def GetLedgerSummary(
        self, request: ledger_pb.GetLedgerSummaryRequest, context: Context
    ) -> ledger_pb.GetLedgerSummaryResponse:
        summary = await self._billing.summary(await self._caller(context))
        return ledger_pb.GetLedgerSummaryResponse(
            cash_in_micro_credits=summary.cash_in,
            platform_revenue_micro_credits=summary.platform_revenue,
            promotional_pool_micro_credits=summary.promotional_pool,
            total_debits_micro_credits=summary.total_debits,
            total_credits_micro_credits=summary.total_credits,
            cash_out_micro_credits=summary.cash_out,
        )

    @translate_errors
    async def CreateHold(
        self, request: ledger_pb.CreateHoldRequest, context: Context
    ) -> ledger_pb.CreateHoldResponse:
        return await self._create_hold(await self._caller(context), request)

    @translate_errors
    async def CreateHolds(
        self, request: ledger_pb.CreateHoldsRequest, context: Context
    ) -> ledger_pb.CreateHoldsResponse:
        caller = await self._batch_caller(context, len(request.items))
        outcomes = await item_outcomes([self._create_hold(caller, item) for item in request.items])
        return ledger_pb.CreateHoldsResponse(
            results=[
                ledger_pb.CreateHoldResult(error=outcome)
                if isinstance(outcome, status_pb2.Status)
                else ledger_pb.CreateHoldResult(response=outcome)
                for outcome in outcomes
            ]
        )

    @translate_errors
    async def SettleHold(
        self, request: ledger_pb.SettleHoldRequest, context: Context
    ) -> ledger_pb.SettleHoldResponse:
        return await self._settle_hold(await self._caller(context), request)

    @translate_errors
    async def SettleHolds(
        self, request: ledger_pb.SettleHoldsRequest, context: Context
    ) -> ledger_pb.SettleHoldsResponse:
        caller = await self._batch_caller(context, len(request.items))
        outcomes = await item_outcomes([self._settle_hold(caller, item) for item in request.items])
        return ledger_pb.SettleHoldsResponse(
            results=[
                ledger_pb.SettleHoldResult(error=outcome)
                if isinstance(outcome, status_pb2.Status)
                else ledger_pb.SettleHoldResult(response=outcome)
                for outcome in outcomes
            ]
        )

    async def _batch_caller(self, context: Context, items: int) -> Principal:
        """The caller of a batch call, who must be an admin: one who may make none of
        its items' calls is refused as a whole, not item by item."""
        caller = await self._caller(context)
        caller.require_admin()
        check_items(items)
        return caller

    async def _create_hold(
        self, caller: Principal, request: ledger_pb.CreateHoldRequest
    ) -> ledger_pb.CreateHoldResponse:
        hold = await self._billing.create_hold(
            caller,
            request.account_id,
            request.amount_micro_credits,
            request.idempotency_key,
            convert.optional_time(request, "expires"),
        )
        return ledger_pb.CreateHoldResponse(hold=convert.hold(hold))

    async def _settle_hold(
        self, caller: Principal, request: ledger_pb.SettleHoldRequest
    ) -> ledger_pb.SettleHoldResponse:
        hold = await self._billing.settle_hold(
            caller,
            request.hold_id,
            request.capture_micro_credits,
            convert.settlement_lines(request),
            request.total_tokens,
        )
        return ledger_pb.SettleHoldResponse(hold=convert.hold(hold))

    @translate_errors
    async def RequestPayout(
        self, request: ledger_pb.RequestPayoutRequest, context: Context
    ) -> ledger_pb.RequestPayoutResponse:
        payout = await self._payouts.request_payout(
            await self._caller(context),
            request.account_id,
            request.amount_micro_credits,
            request.idempotency_key,
        )
        return ledger_pb.RequestPayoutResponse(payout=convert.payout(payout))

    @translate_errors
    async def ListPayouts(
        self, request: ledger_pb.ListPayoutsRequest, context: Context
    ) -> ledger_pb.ListPayoutsResponse:
        items, token = await self._payouts.list_payouts(
            await self._caller(context), request.account_id, request.page_size, request.page_token
        )
        return ledger_pb.ListPayoutsResponse(
            payouts=[convert.payout(p) for p in items], next_page_token=token
        )

    @translate_errors
    async def CompletePayout(
        self, request: ledger_pb.CompletePayoutRequest, context: Context
    ) -> ledger_pb.CompletePayoutResponse:
        payout = await self._payouts.complete(
            await self._caller(context), request.payout_id, request.reference
        )
        return ledger_pb.CompletePayoutResponse(payout=convert.payout(payout))

    @translate_errors
    async def RejectPayout(
        self, request: ledger_pb.RejectPayoutRequest, context: Context
    ) -> ledger_pb.RejectPayoutResponse:
        payout = await self._payouts.reject(
            await self._caller(context), request.payout_id, request.reason
        )
        return ledger_pb.RejectPayoutResponse(payout=convert.payout(payout))
