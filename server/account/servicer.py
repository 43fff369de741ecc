"""gRPC servicers of the account server: proto in, one service call, proto out.

Each method first resolves the caller from the ``authorization`` metadata
(AccountService.principal); the service method it then calls checks what
that caller may do.
"""

from __future__ import annotations

from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as api_key_pb
from resultity.account.v1 import api_key_service_pb2_grpc as api_key_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc
from resultity.account.v1 import referral_service_pb2 as referral_pb
from resultity.account.v1 import referral_service_pb2_grpc as referral_grpc

from core.grpc_errors import translate_errors
from server.account import convert
from server.account.authz import Principal
from server.account.billing import BillingService
from server.account.service import AccountService
from server.common.inference_logging_proto import logging_from_pb, logging_to_pb
from server.common.rate_limits_proto import rate_limits_from_pb, rate_limits_to_pb
from server.common.transport import Context, authorization


class CallerBase:
    def __init__(self, accounts: AccountService, billing: BillingService) -> None:
        self._accounts = accounts
        self._billing = billing

    async def _caller(self, context: Context) -> Principal:
        return await self._accounts.principal(authorization(context))


class AccountServicer(CallerBase, account_grpc.AccountServiceServicer):
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
    async def GetCaller(
        self, request: account_pb.GetCallerRequest, context: Context
    ) -> account_pb.GetCallerResponse:
        principal, account, key = await self._accounts.describe_caller(authorization(context))
        return account_pb.GetCallerResponse(
            account=None if account is None else convert.account(account),
            admin=principal.admin,
            api_key=None if key is None else convert.api_key(key),
        )

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

    @translate_errors
    async def SetAccountRateLimits(
        self, request: account_pb.SetAccountRateLimitsRequest, context: Context
    ) -> account_pb.SetAccountRateLimitsResponse:
        account = await self._accounts.set_account_rate_limits(
            await self._caller(context),
            request.account_id,
            rate_limits_from_pb(request.rate_limits),
        )
        return account_pb.SetAccountRateLimitsResponse(account=convert.account(account))

    @translate_errors
    async def SetAccountInferenceLogging(
        self, request: account_pb.SetAccountInferenceLoggingRequest, context: Context
    ) -> account_pb.SetAccountInferenceLoggingResponse:
        account = await self._accounts.set_account_inference_logging(
            await self._caller(context),
            request.account_id,
            logging_from_pb(request.inference_logging),
        )
        return account_pb.SetAccountInferenceLoggingResponse(account=convert.account(account))


class ApiKeyServicer(CallerBase, api_key_grpc.ApiKeyServiceServicer):
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
        keys, token = await self._accounts.list_api_keys(
            await self._caller(context), request.account_id, request.page_size, request.page_token
        )
        return api_key_pb.ListApiKeysResponse(
            api_keys=[convert.api_key(k) for k in keys], next_page_token=token
        )

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
        active = await self._accounts.authenticate_api_key(
            await self._caller(context), request.secret
        )
        return api_key_pb.AuthenticateApiKeyResponse(
            api_key=convert.api_key(active.api_key),
            account_rate_limits=rate_limits_to_pb(active.account_limits),
            account_inference_logging=logging_to_pb(active.account_logging),
        )


class NodeTokenServicer(CallerBase, node_token_grpc.NodeTokenServiceServicer):
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


class ReferralServicer(CallerBase, referral_grpc.ReferralServiceServicer):
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
