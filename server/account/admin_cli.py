"""`resultity account <command>`: operator commands over the account layer's gRPC API.

Authenticates with the service token (RESULTITY_SERVICE_TOKEN, or the
service-token file in --data-dir) unless RESULTITY_API_KEY names a key with
the management or admin scope. Prints responses as JSON. Amounts on the
command line are in credits (decimal); the API's micro-credits are printed.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as key_pb
from resultity.account.v1 import api_key_service_pb2_grpc as key_grpc
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import contribution_service_pb2_grpc as contribution_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc
from resultity.account.v1 import rate_limits_pb2 as rate_limits_pb
from resultity.account.v1 import referral_service_pb2 as referral_pb
from resultity.account.v1 import referral_service_pb2_grpc as referral_grpc

from core import channels
from core.metadata import bearer_metadata
from server.account.billing_cli import TOPICS, add_topics, micro, topic_calls
from server.addresses import grpc_target
from server.common.inference_logging_cli import logging_from_args, logging_options
from server.secrets import cli_credential

SCOPES = {
    "inference": key_pb.API_KEY_SCOPE_INFERENCE,
    "management": key_pb.API_KEY_SCOPE_MANAGEMENT,
    "admin": key_pb.API_KEY_SCOPE_ADMIN,
}


def add_commands(account: argparse.ArgumentParser) -> None:
    """Adds the operator commands under `resultity account` (no command: serve)."""
    account.add_argument(
        "--target",
        help="HOST:PORT the commands call (default: the one `resultity up` wrote in "
        "--data-dir, else 127.0.0.1:50051)",
    )
    commands = account.add_subparsers(dest="account_command", metavar="COMMAND")
    create = commands.add_parser("create", help="create an account")
    create.add_argument("name")
    create.add_argument("--email", default="")
    create.add_argument("--referral-code", default="")
    commands.add_parser("list", help="list accounts").add_argument("--page-token", default="")
    for name, text in (
        ("get", "show an account"),
        ("disable", "disable an account"),
        ("balance", "show a balance"),
        ("history", "list transactions"),
        ("keys", "list API keys"),
        ("referral-code", "show the referral code"),
        ("contributions", "contribution totals per epoch"),
        ("earnings", "an operator's earnings per epoch (from the ledger's events)"),
    ):
        commands.add_parser(name, help=text).add_argument("account_id")
    for name, text in (("top-up", "add paid credits"), ("grant", "grant from the promo pool")):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("account_id")
        parser.add_argument("credits", type=Decimal)
        parser.add_argument("--idempotency-key", default="")
    fund = commands.add_parser("fund-pool", help="move credits into the promotional pool")
    fund.add_argument("credits", type=Decimal)
    fund.add_argument("--idempotency-key", default="")
    key = commands.add_parser("create-key", help="issue an API key (shown once)")
    key.add_argument("account_id")
    key.add_argument("--name", default="")
    key.add_argument("--scope", action="append", choices=sorted(SCOPES), default=[])
    key.add_argument("--model", action="append", default=[], help="allow only this model")
    key.add_argument("--expires-days", type=float)
    _rate_limit_options(key)
    limits = commands.add_parser(
        "set-rate-limits", help="set an account's rate limits (unset: platform default)"
    )
    limits.add_argument("account_id")
    _rate_limit_options(limits)
    logging = commands.add_parser(
        "set-inference-logging",
        help="opt an account in to (or out of) full logs of its inference requests",
    )
    logging.add_argument("account_id")
    logging_options(logging)
    commands.add_parser("revoke-key", help="revoke an API key").add_argument("api_key_id")
    node_token = commands.add_parser(
        "create-node-token", help="issue a node token for an operator's agent (shown once)"
    )
    node_token.add_argument("account_id")
    node_token.add_argument("--name", default="")
    commands.add_parser("summary", help="system balances and ledger totals")
    add_topics(commands)


async def run_command(args: argparse.Namespace) -> None:
    metadata = bearer_metadata(cli_credential(args.data_dir))
    async with channels.insecure_channel(grpc_target(args.data_dir, args.target)) as channel:
        accounts = account_grpc.AccountServiceStub(channel)
        keys = key_grpc.ApiKeyServiceStub(channel)
        ledger = ledger_grpc.LedgerServiceStub(channel)
        idempotency = getattr(args, "idempotency_key", "") or uuid.uuid4().hex
        calls: dict[str, Callable[[], Awaitable[Message]]] = {
            "create": lambda: accounts.CreateAccount(
                account_pb.CreateAccountRequest(
                    name=args.name, email=args.email, referral_code=args.referral_code
                ),
                metadata=metadata,
            ),
            "list": lambda: accounts.ListAccounts(
                account_pb.ListAccountsRequest(page_token=args.page_token), metadata=metadata
            ),
            "get": lambda: accounts.GetAccount(
                account_pb.GetAccountRequest(account_id=args.account_id), metadata=metadata
            ),
            "disable": lambda: accounts.DisableAccount(
                account_pb.DisableAccountRequest(account_id=args.account_id), metadata=metadata
            ),
            "balance": lambda: ledger.GetBalance(
                ledger_pb.GetBalanceRequest(account_id=args.account_id), metadata=metadata
            ),
            "history": lambda: ledger.ListTransactions(
                ledger_pb.ListTransactionsRequest(account_id=args.account_id), metadata=metadata
            ),
            "keys": lambda: keys.ListApiKeys(
                key_pb.ListApiKeysRequest(account_id=args.account_id), metadata=metadata
            ),
            "referral-code": lambda: referral_grpc.ReferralServiceStub(channel).GetReferralCode(
                referral_pb.GetReferralCodeRequest(account_id=args.account_id), metadata=metadata
            ),
            "contributions": lambda: contribution_grpc.ContributionServiceStub(
                channel
            ).GetContributionTotals(
                contribution_pb.GetContributionTotalsRequest(operator_account_id=args.account_id),
                metadata=metadata,
            ),
            "earnings": lambda: contribution_grpc.ContributionServiceStub(
                channel
            ).GetOperatorEarnings(
                contribution_pb.GetOperatorEarningsRequest(operator_account_id=args.account_id),
                metadata=metadata,
            ),
            "top-up": lambda: ledger.TopUp(
                ledger_pb.TopUpRequest(
                    account_id=args.account_id,
                    amount_micro_credits=micro(args.credits),
                    idempotency_key=idempotency,
                ),
                metadata=metadata,
            ),
            "grant": lambda: ledger.GrantCredits(
                ledger_pb.GrantCreditsRequest(
                    account_id=args.account_id,
                    amount_micro_credits=micro(args.credits),
                    idempotency_key=idempotency,
                ),
                metadata=metadata,
            ),
            "fund-pool": lambda: ledger.FundPromotionalPool(
                ledger_pb.FundPromotionalPoolRequest(
                    amount_micro_credits=micro(args.credits), idempotency_key=idempotency
                ),
                metadata=metadata,
            ),
            "create-key": lambda: keys.CreateApiKey(_key_request(args), metadata=metadata),
            "set-rate-limits": lambda: accounts.SetAccountRateLimits(
                account_pb.SetAccountRateLimitsRequest(
                    account_id=args.account_id, rate_limits=_rate_limits(args)
                ),
                metadata=metadata,
            ),
            "set-inference-logging": lambda: accounts.SetAccountInferenceLogging(
                account_pb.SetAccountInferenceLoggingRequest(
                    account_id=args.account_id, inference_logging=logging_from_args(args)
                ),
                metadata=metadata,
            ),
            "create-node-token": lambda: node_token_grpc.NodeTokenServiceStub(
                channel
            ).CreateNodeToken(
                node_token_pb.CreateNodeTokenRequest(account_id=args.account_id, name=args.name),
                metadata=metadata,
            ),
            "revoke-key": lambda: keys.RevokeApiKey(
                key_pb.RevokeApiKeyRequest(api_key_id=args.api_key_id), metadata=metadata
            ),
            "summary": lambda: ledger.GetLedgerSummary(
                ledger_pb.GetLedgerSummaryRequest(), metadata=metadata
            ),
        }
        calls.update(topic_calls(channel, metadata, args))
        command = args.account_command
        if command in TOPICS:
            command = f"{command} {args.topic_command}"
        response: Any = await calls[command]()
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))


def _rate_limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests-per-minute", type=int)
    parser.add_argument("--tokens-per-minute", type=int)
    parser.add_argument("--concurrent-requests", type=int)


def _rate_limits(args: argparse.Namespace) -> rate_limits_pb.RateLimits:
    return rate_limits_pb.RateLimits(
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
        concurrent_requests=args.concurrent_requests,
    )


def _key_request(args: argparse.Namespace) -> key_pb.CreateApiKeyRequest:
    request = key_pb.CreateApiKeyRequest(
        account_id=args.account_id,
        name=args.name,
        scopes=[SCOPES[scope] for scope in args.scope],
        allowed_models=args.model,
        rate_limits=_rate_limits(args),
    )
    if args.expires_days is not None:
        expires = Timestamp()
        expires.FromDatetime(datetime.now(UTC) + timedelta(days=args.expires_days))
        request.expires.CopyFrom(expires)
    return request
