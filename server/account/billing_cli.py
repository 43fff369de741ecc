"""`resultity account plans|subscriptions|referral-rules|payouts|policy ...`.

Operator commands for subscriptions, referral rules, payouts and the
settlement policy; admin_cli.py registers them and runs them with its
credential. Amounts on the command line are in credits (decimal).
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal

import grpc
from google.protobuf.message import Message
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import contribution_service_pb2_grpc as contribution_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import referral_service_pb2 as referral_pb
from resultity.account.v1 import referral_service_pb2_grpc as referral_grpc
from resultity.account.v1 import subscription_service_pb2 as sub_pb
from resultity.account.v1 import subscription_service_pb2_grpc as sub_grpc

Metadata = tuple[tuple[str, str], ...]
Call = Callable[[], Awaitable[Message]]

# Each topic's subcommands: name -> help.
TOPICS: dict[str, tuple[str, dict[str, str]]] = {
    "plans": ("subscription plans", {"create": "create a plan", "list": "list plans"}),
    "subscriptions": (
        "subscriptions",
        {
            "subscribe": "subscribe an account to a plan (charges the first period)",
            "cancel": "stop a subscription's renewals",
            "list": "list subscriptions (every account's without --account)",
            "renew-due": "expire ended periods, charge and grant the current ones",
        },
    ),
    "referral-rules": (
        "referral bonus rules",
        {"get": "show the rules", "set": "change the rules"},
    ),
    "payouts": (
        "operator payouts",
        {
            "request": "reserve earned credits for a payout",
            "list": "list payouts (every account's without --account)",
            "complete": "record a payout as paid",
            "reject": "reject a payout (its credits return to the earnings)",
        },
    ),
    "policy": (
        "settlement policy",
        {"get": "show the policy in force", "set": "store a new version"},
    ),
}


def micro(credits: Decimal) -> int:
    return int(credits * 1_000_000)


def add_topics(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for topic, (text, subcommands) in TOPICS.items():
        topic_parser = commands.add_parser(topic, help=text)
        sub = topic_parser.add_subparsers(dest="topic_command", metavar="COMMAND", required=True)
        parsers = {name: sub.add_parser(name, help=help) for name, help in subcommands.items()}
        _add_arguments(topic, parsers)


def _paged(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--account", default="", help="one account's only")
    parser.add_argument("--page-token", default="")


def _add_arguments(topic: str, parsers: dict[str, argparse.ArgumentParser]) -> None:
    if topic == "plans":
        parsers["create"].add_argument("name")
        parsers["create"].add_argument("price", type=Decimal, help="credits per month")
        parsers["create"].add_argument("allowance", type=Decimal, help="credits per month")
    elif topic == "subscriptions":
        parsers["subscribe"].add_argument("account_id")
        parsers["subscribe"].add_argument("plan_id")
        parsers["cancel"].add_argument("subscription_id")
        _paged(parsers["list"])
    elif topic == "referral-rules":
        parsers["set"].add_argument("--bonus-bps", type=int, required=True)
        parsers["set"].add_argument("--rewarded-top-ups", type=int, required=True)
        parsers["set"].add_argument("--max-bonus", type=Decimal, required=True, help="credits")
    elif topic == "payouts":
        parsers["request"].add_argument("account_id")
        parsers["request"].add_argument("credits", type=Decimal)
        parsers["request"].add_argument("--idempotency-key", default="")
        _paged(parsers["list"])
        for name, note in (("complete", "--reference"), ("reject", "--reason")):
            parsers[name].add_argument("payout_id")
            parsers[name].add_argument(note, default="")
    elif topic == "policy":
        policy = parsers["set"]
        policy.add_argument("--operator-share-bps", type=int, help="the platform fee is the rest")
        policy.add_argument("--epoch-seconds", type=int)
        policy.add_argument("--min-payout", type=Decimal, help="credits")
        policy.add_argument("--max-payout", type=Decimal, help="credits")


def topic_calls(
    channel: grpc.aio.Channel, metadata: Metadata, args: argparse.Namespace
) -> dict[str, Call]:
    """The call behind each `TOPIC COMMAND`, keyed "topic command"."""
    plans = sub_grpc.SubscriptionServiceStub(channel)
    ledger = ledger_grpc.LedgerServiceStub(channel)
    referrals = referral_grpc.ReferralServiceStub(channel)
    contributions = contribution_grpc.ContributionServiceStub(channel)
    account, page_token = getattr(args, "account", ""), getattr(args, "page_token", "")
    return {
        "plans create": lambda: plans.CreatePlan(
            sub_pb.CreatePlanRequest(
                name=args.name,
                monthly_price_micro_credits=micro(args.price),
                monthly_allowance_micro_credits=micro(args.allowance),
            ),
            metadata=metadata,
        ),
        "plans list": lambda: plans.ListPlans(sub_pb.ListPlansRequest(), metadata=metadata),
        "subscriptions subscribe": lambda: plans.Subscribe(
            sub_pb.SubscribeRequest(account_id=args.account_id, plan_id=args.plan_id),
            metadata=metadata,
        ),
        "subscriptions cancel": lambda: plans.CancelSubscription(
            sub_pb.CancelSubscriptionRequest(subscription_id=args.subscription_id),
            metadata=metadata,
        ),
        "subscriptions list": lambda: plans.ListSubscriptions(
            sub_pb.ListSubscriptionsRequest(account_id=account, page_token=page_token),
            metadata=metadata,
        ),
        "subscriptions renew-due": lambda: plans.RenewSubscriptions(
            sub_pb.RenewSubscriptionsRequest(), metadata=metadata
        ),
        "referral-rules get": lambda: referrals.GetReferralRules(
            referral_pb.GetReferralRulesRequest(), metadata=metadata
        ),
        "referral-rules set": lambda: referrals.UpdateReferralRules(
            referral_pb.UpdateReferralRulesRequest(
                rules=referral_pb.ReferralRules(
                    bonus_basis_points=args.bonus_bps,
                    rewarded_top_ups=args.rewarded_top_ups,
                    max_bonus_micro_credits=micro(args.max_bonus),
                )
            ),
            metadata=metadata,
        ),
        "payouts request": lambda: ledger.RequestPayout(
            ledger_pb.RequestPayoutRequest(
                account_id=args.account_id,
                amount_micro_credits=micro(args.credits),
                idempotency_key=args.idempotency_key or uuid.uuid4().hex,
            ),
            metadata=metadata,
        ),
        "payouts list": lambda: ledger.ListPayouts(
            ledger_pb.ListPayoutsRequest(account_id=account, page_token=page_token),
            metadata=metadata,
        ),
        "payouts complete": lambda: ledger.CompletePayout(
            ledger_pb.CompletePayoutRequest(payout_id=args.payout_id, reference=args.reference),
            metadata=metadata,
        ),
        "payouts reject": lambda: ledger.RejectPayout(
            ledger_pb.RejectPayoutRequest(payout_id=args.payout_id, reason=args.reason),
            metadata=metadata,
        ),
        "policy get": lambda: contributions.GetSettlementPolicy(
            contribution_pb.GetSettlementPolicyRequest(), metadata=metadata
        ),
        "policy set": lambda: _set_policy(contributions, metadata, args),
    }


async def _set_policy(
    contributions: contribution_grpc.ContributionServiceAsyncStub,
    metadata: Metadata,
    args: argparse.Namespace,
) -> Message:
    """Stores the policy in force with the given flags changed."""
    current = await contributions.GetSettlementPolicy(
        contribution_pb.GetSettlementPolicyRequest(), metadata=metadata
    )
    policy = current.policy
    if args.operator_share_bps is not None:
        policy.operator_share_basis_points = args.operator_share_bps
        policy.platform_fee_basis_points = 10_000 - args.operator_share_bps
    if args.epoch_seconds is not None:
        policy.epoch_seconds = args.epoch_seconds
    if args.min_payout is not None:
        policy.min_payout_micro_credits = micro(args.min_payout)
    if args.max_payout is not None:
        policy.max_payout_micro_credits = micro(args.max_payout)
    response: Message = await contributions.UpdateSettlementPolicy(
        contribution_pb.UpdateSettlementPolicyRequest(policy=policy), metadata=metadata
    )
    return response
