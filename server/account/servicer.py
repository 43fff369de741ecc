"""gRPC servicers of the account server: proto in, one service call, proto out.

Each method first resolves the caller from the ``authorization`` metadata
(AccountService.principal); the service method it then calls checks what
that caller may do.
"""

from __future__ import annotations

from typing import Any

import grpc
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as api_key_pb
from resultity.account.v1 import api_key_service_pb2_grpc as api_key_grpc
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import contribution_service_pb2_grpc as contribution_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc
from resultity.account.v1 import referral_service_pb2 as referral_pb
from resultity.account.v1 import referral_service_pb2_grpc as referral_grpc

from server.account import convert
from server.account.authz import Principal
from server.account.billing import BillingService
from server.account.service import AccountService
from server.common.grpc_errors import translate_errors

Context = grpc.aio.ServicerContext[Any, Any]


def authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class _Base:
    def __init__(self, accounts: AccountService, billing: BillingService) -> None:
        self._accounts = accounts
        self._billing = billing

    async def _caller(self, context: Context) -> Principal:
        return await self._accounts.principal(authorization(context))


class AccountServicer(_Base, account_grpc.AccountServiceServicer):
    @translate_errors
    async def CreateAccount(
        self, request: account_pb.CreateAccountRequest, context: Context
    ) -> account_pb.CreateAccountResponse:
        account = await self._accounts.create_account(
            await self._caller(context), request.name, request.email, request.referral_code
        )
        return account_pb.CreateAccountResponse(account=convert.account(account))

    @translate_errors
    async def GetAccount(
        self, request: account_pb.GetAccountRequest, context: Context
    ) -> account_pb.GetAccountResponse:
        account = await self._accounts.get_account(await self._caller(context), request.account_id)
        return account_pb.GetAccountResponse(account=convert.account(account))

    @translate_errors
    async def UpdateAccount(
        self, request: account_pb.UpdateAccountRequest, context: Context
    ) -> account_pb.UpdateAccountResponse:
        account = await self._accounts.update_account(
            await self._caller(context),
            request.account_id,
            request.name if request.HasField("name") else None,
            request.email if request.HasField("email") else None,
        )
        return account_pb.UpdateAccountResponse(account=convert.account(account))

    @translate_errors
    async def ListAccounts(
        self, request: account_pb.ListAccountsRequest, context: Context
    ) -> account_pb.ListAccountsResponse:
        accounts, token = await self._accounts.list_accounts(
            await self._caller(context), request.page_size, request.page_token
        )
        return account_pb.ListAccountsResponse(
            accounts=[convert.account(a) for a in accounts], next_page_token=token
        )

    @translate_errors
    async def DisableAccount(
        self, request: account_pb.DisableAccountRequest, context: Context
    ) -> account_pb.DisableAccountResponse:
        account = await self._accounts.disable_account(
            await self._caller(context), request.account_id
        )
        return account_pb.DisableAccountResponse(account=convert.account(account))


class ApiKeyServicer(_Base, api_key_grpc.ApiKeyServiceServicer):
    @translate_errors
    async def CreateApiKey(
        self, request: api_key_pb.CreateApiKeyRequest, context: Context
    ) -> api_key_pb.CreateApiKeyResponse:
        issued = await self._accounts.create_api_key(
            await self._caller(context),
            request.account_id,
            request.name,
            convert.key_policy(request),
        )
        return api_key_pb.CreateApiKeyResponse(
            api_key=convert.api_key(issued.api_key), secret=issued.secret
        )

    @translate_errors
    async def ListApiKeys(
        self, request: api_key_pb.ListApiKeysRequest, context: Context
    ) -> api_key_pb.ListApiKeysResponse:
        keys = await self._accounts.list_api_keys(await self._caller(context), request.account_id)
        return api_key_pb.ListApiKeysResponse(api_keys=[convert.api_key(k) for k in keys])

    @translate_errors
    async def RevokeApiKey(
        self, request: api_key_pb.RevokeApiKeyRequest, context: Context
    ) -> api_key_pb.RevokeApiKeyResponse:
        key = await self._accounts.revoke_api_key(await self._caller(context), request.api_key_id)
        return api_key_pb.RevokeApiKeyResponse(api_key=convert.api_key(key))

    @translate_errors
    async def AuthenticateApiKey(
        self, request: api_key_pb.AuthenticateApiKeyRequest, context: Context
    ) -> api_key_pb.AuthenticateApiKeyResponse:
        key = await self._accounts.authenticate_api_key(request.secret)
        return api_key_pb.AuthenticateApiKeyResponse(api_key=convert.api_key(key))


class NodeTokenServicer(_Base, node_token_grpc.NodeTokenServiceServicer):
    @translate_errors
    async def CreateNodeToken(
        self, request: node_token_pb.CreateNodeTokenRequest, context: Context
    ) -> node_token_pb.CreateNodeTokenResponse:
        issued = await self._accounts.create_node_token(
            await self._caller(context), request.account_id, request.name
        )
        return node_token_pb.CreateNodeTokenResponse(
            node_token=convert.api_key(issued.api_key), secret=issued.secret
        )

    @translate_errors
    async def AuthenticateNodeToken(
        self, request: node_token_pb.AuthenticateNodeTokenRequest, context: Context
    ) -> node_token_pb.AuthenticateNodeTokenResponse:
        key = await self._accounts.authenticate_node_token(
            await self._caller(context), request.secret
        )
        return node_token_pb.AuthenticateNodeTokenResponse(node_token=convert.api_key(key))


class LedgerServicer(_Base, ledger_grpc.LedgerServiceServicer):
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
        )

    @translate_errors
    async def CreateHold(
        self, request: ledger_pb.CreateHoldRequest, context: Context
    ) -> ledger_pb.CreateHoldResponse:
        hold = await self._billing.create_hold(
            await self._caller(context),
            request.account_id,
            request.amount_micro_credits,
            request.idempotency_key,
            convert.optional_time(request, "expires"),
        )
        return ledger_pb.CreateHoldResponse(hold=convert.hold(hold))

    @translate_errors
    async def SettleHold(
        self, request: ledger_pb.SettleHoldRequest, context: Context
    ) -> ledger_pb.SettleHoldResponse:
        hold = await self._billing.settle_hold(
            await self._caller(context),
            request.hold_id,
            request.capture_micro_credits,
            convert.settlement_lines(request),
        )
        return ledger_pb.SettleHoldResponse(hold=convert.hold(hold))


class ContributionServicer(_Base, contribution_grpc.ContributionServiceServicer):
    @translate_errors
    async def ListContributions(
        self, request: contribution_pb.ListContributionsRequest, context: Context
    ) -> contribution_pb.ListContributionsResponse:
        items, token = await self._billing.list_contributions(
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
        overall, epochs, epoch_seconds = await self._billing.contribution_totals(
            await self._caller(context), request.operator_account_id, request.epochs
        )
        return contribution_pb.GetContributionTotalsResponse(
            overall=convert.contribution_total(overall),
            epochs=[convert.contribution_total(e) for e in epochs],
            epoch_seconds=epoch_seconds,
        )


class ReferralServicer(_Base, referral_grpc.ReferralServiceServicer):
    @translate_errors
    async def GetReferralCode(
        self, request: referral_pb.GetReferralCodeRequest, context: Context
    ) -> referral_pb.GetReferralCodeResponse:
        code = await self._accounts.referral_code(await self._caller(context), request.account_id)
        return referral_pb.GetReferralCodeResponse(referral_code=code)

    @translate_errors
    async def ListReferrals(
        self, request: referral_pb.ListReferralsRequest, context: Context
    ) -> referral_pb.ListReferralsResponse:
        items = await self._accounts.list_referrals(await self._caller(context), request.account_id)
        return referral_pb.ListReferralsResponse(referrals=[convert.referral(r) for r in items])

    @translate_errors
    async def GetReferralRules(
        self, request: referral_pb.GetReferralRulesRequest, context: Context
    ) -> referral_pb.GetReferralRulesResponse:
        rules = await self._accounts.referral_rules(await self._caller(context))
        return referral_pb.GetReferralRulesResponse(rules=convert.rules_to_pb(rules))

    @translate_errors
    async def UpdateReferralRules(
        self, request: referral_pb.UpdateReferralRulesRequest, context: Context
    ) -> referral_pb.UpdateReferralRulesResponse:
        rules = await self._accounts.set_referral_rules(
            await self._caller(context), convert.rules_from_pb(request.rules)
        )
        return referral_pb.UpdateReferralRulesResponse(rules=convert.rules_to_pb(rules))
