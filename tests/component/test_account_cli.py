"""`resultity account` operator commands for plans, subscriptions, referral rules,
payouts and the settlement policy, against a running platform over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.account_support import Stubs, earn
from tests.harness import Platform, operator_command, running_platform


@pytest.fixture(scope="module")
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


@pytest.fixture
def account_cli(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    return operator_command(platform, monkeypatch, capsys, "account", "--target", platform.target)


async def test_plans_and_subscriptions(account_cli: Any) -> None:
    plan = (await account_cli("plans", "create", "pro", "3", "5"))["plan"]
    assert plan["monthly_price_micro_credits"] == "3000000"
    assert plan["plan_id"] in {p["plan_id"] for p in (await account_cli("plans", "list"))["plans"]}
    account = (await account_cli("create", "subscriber"))["account"]["account_id"]
    await account_cli("top-up", account, "10")

    subscribed = await account_cli("subscriptions", "subscribe", account, plan["plan_id"])
    subscription = subscribed["subscription"]
    assert subscription["status"] == "SUBSCRIPTION_STATUS_ACTIVE"
    balance = await account_cli("balance", account)
    assert balance["balance"]["available_micro_credits"] == str(12_000_000)
    await account_cli("subscriptions", "renew-due")
    listed = await account_cli("subscriptions", "list", "--account", account)
    assert [s["subscription_id"] for s in listed["subscriptions"]] == [
        subscription["subscription_id"]
    ]
    cancelled = await account_cli("subscriptions", "cancel", subscription["subscription_id"])
    assert cancelled["subscription"]["status"] == "SUBSCRIPTION_STATUS_CANCELLED"


async def test_referral_rules_and_policy_are_read_and_changed(account_cli: Any) -> None:
    rules = (await account_cli("referral-rules", "get"))["rules"]
    policy = (await account_cli("policy", "get"))["policy"]
    try:
        changed = await account_cli(
            "referral-rules",
            "set",
            "--bonus-bps",
            "500",
            "--rewarded-top-ups",
            "1",
            "--max-bonus",
            "2",
        )
        assert changed["rules"] == {
            "bonus_basis_points": 500,
            "rewarded_top_ups": 1,
            "max_bonus_micro_credits": "2000000",
        }
        updated = (await account_cli("policy", "set", "--operator-share-bps", "7000"))["policy"]
        assert (updated["operator_share_basis_points"], updated["platform_fee_basis_points"]) == (
            7000,
            3000,
        )
        assert updated["version"] == policy["version"] + 1
        assert updated["min_payout_micro_credits"] == policy["min_payout_micro_credits"]
    finally:
        # The database is shared with other tests: put both back.
        await account_cli(
            "referral-rules",
            "set",
            "--bonus-bps",
            str(rules.get("bonus_basis_points", 0)),
            "--rewarded-top-ups",
            str(rules.get("rewarded_top_ups", 0)),
            "--max-bonus",
            str(int(rules.get("max_bonus_micro_credits", "0")) / 1_000_000),
        )
        await account_cli(
            "policy", "set", "--operator-share-bps", str(policy["operator_share_basis_points"])
        )


async def test_payouts_are_requested_listed_and_resolved(
    account_cli: Any, platform: Platform
) -> None:
    operator = (await account_cli("create", "operator"))["account"]["account_id"]
    await earn(Stubs.on(platform.channel), platform.service, operator, 5_000_000)
    first = (await account_cli("payouts", "request", operator, "1.5"))["payout"]
    second = (await account_cli("payouts", "request", operator, "1"))["payout"]
    paid = await account_cli("payouts", "complete", first["payout_id"], "--reference", "wire 7")
    assert (paid["payout"]["status"], paid["payout"]["note"]) == (
        "PAYOUT_STATUS_COMPLETED",
        "wire 7",
    )
    rejected = await account_cli("payouts", "reject", second["payout_id"], "--reason", "no")
    assert rejected["payout"]["status"] == "PAYOUT_STATUS_REJECTED"
    listed = await account_cli("payouts", "list", "--account", operator)
    assert [p["payout_id"] for p in listed["payouts"]] == [
        second["payout_id"],
        first["payout_id"],
    ]
    summary = await account_cli("summary")
    assert int(summary["cash_out_micro_credits"]) >= 1_500_000


async def test_earnings_show_what_the_ledger_events_projected(
    platform: Platform, account_cli: Any
) -> None:
    operator = (await account_cli("create", "operator"))["account"]["account_id"]
    await earn(Stubs.on(platform.channel), platform.service, operator, 1_000)
    await earn(Stubs.on(platform.channel), platform.service, operator, 2_000)

    async def projected() -> list[Any]:
        return list((await account_cli("earnings", operator)).get("epochs", []))

    async with asyncio.timeout(30):
        while not (epochs := await projected()) or epochs[0]["jobs"] != "2":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    # 80% of each capture; 9 tokens each.
    assert (epochs[0]["tokens"], epochs[0]["amount_micro_credits"]) == ("18", "2400")
