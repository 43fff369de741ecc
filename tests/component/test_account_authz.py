"""Authorization of the account layer over real gRPC, and key scopes at the cloud.

A management key acts on its own account only; inference-only keys, unknown
credentials and missing credentials are refused; admin rights (admin-scoped
key or service token) reach every account.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import api_key_service_pb2 as key_pb
from resultity.account.v1 import contribution_service_pb2 as contribution_pb
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import referral_service_pb2 as referral_pb
from resultity.account.v1 import subscription_service_pb2 as sub_pb
from resultity.cloud.v1 import inference_service_pb2 as cloud_pb
from resultity.common.v1 import inference_pb2 as common_pb

from core.metadata import bearer_metadata
from tests.account_support import Stubs, expect_error
from tests.harness import Platform, running_platform

Code = grpc.StatusCode
MANAGE = (key_pb.API_KEY_SCOPE_INFERENCE, key_pb.API_KEY_SCOPE_MANAGEMENT)


@dataclass
class User:
    account_id: str
    key: str
    key_id: str

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@pytest.fixture(scope="module")
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


@pytest.fixture(scope="module")
def stubs(platform: Platform) -> Stubs:
    return Stubs.on(platform.channel)


async def new_user(platform: Platform, stubs: Stubs, *scopes: int, **key_args: object) -> User:
    account = (
        await stubs.accounts.CreateAccount(
            account_pb.CreateAccountRequest(name="user"), metadata=platform.service
        )
    ).account
    await stubs.ledger.TopUp(
        ledger_pb.TopUpRequest(
            account_id=account.account_id,
            amount_micro_credits=1_000_000,
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=platform.service,
    )
    issued = await stubs.keys.CreateApiKey(
        key_pb.CreateApiKeyRequest(
            account_id=account.account_id, scopes=scopes or MANAGE, **key_args
        ),
        metadata=platform.service,
    )
    return User(account.account_id, issued.secret, issued.api_key.api_key_id)


async def test_a_user_cannot_read_or_change_another_users_objects(
    platform: Platform, stubs: Stubs
) -> None:
    a, b = await new_user(platform, stubs), await new_user(platform, stubs)
    other = b.account_id
    denied = [
        stubs.accounts.GetAccount(account_pb.GetAccountRequest(account_id=other), metadata=a.auth),
        stubs.accounts.UpdateAccount(
            account_pb.UpdateAccountRequest(account_id=other, name="x"), metadata=a.auth
        ),
        stubs.keys.ListApiKeys(key_pb.ListApiKeysRequest(account_id=other), metadata=a.auth),
        stubs.keys.CreateApiKey(key_pb.CreateApiKeyRequest(account_id=other), metadata=a.auth),
        stubs.keys.RevokeApiKey(key_pb.RevokeApiKeyRequest(api_key_id=b.key_id), metadata=a.auth),
        stubs.ledger.GetBalance(ledger_pb.GetBalanceRequest(account_id=other), metadata=a.auth),
        stubs.ledger.ListTransactions(
            ledger_pb.ListTransactionsRequest(account_id=other), metadata=a.auth
        ),
        stubs.referrals.GetReferralCode(
            referral_pb.GetReferralCodeRequest(account_id=other), metadata=a.auth
        ),
        stubs.referrals.ListReferrals(
            referral_pb.ListReferralsRequest(account_id=other), metadata=a.auth
        ),
        stubs.contributions.ListContributions(
            contribution_pb.ListContributionsRequest(operator_account_id=other), metadata=a.auth
        ),
        stubs.contributions.GetContributionTotals(
            contribution_pb.GetContributionTotalsRequest(operator_account_id=other),
            metadata=a.auth,
        ),
        stubs.contributions.GetOperatorEarnings(
            contribution_pb.GetOperatorEarningsRequest(operator_account_id=other),
            metadata=a.auth,
        ),
        stubs.subscriptions.GetSubscription(
            sub_pb.GetSubscriptionRequest(account_id=other), metadata=a.auth
        ),
        stubs.subscriptions.ListSubscriptions(
            sub_pb.ListSubscriptionsRequest(account_id=other), metadata=a.auth
        ),
    ]
    for call in denied:
        await expect_error(call, Code.PERMISSION_DENIED, "PERMISSION_DENIED")

    # B's key still works, B's objects are unchanged, and A can do all this to itself.
    keys = await stubs.keys.ListApiKeys(
        key_pb.ListApiKeysRequest(account_id=other), metadata=b.auth
    )
    assert [(k.api_key_id, k.HasField("revoked")) for k in keys.api_keys] == [(b.key_id, False)]
    assert all(not hasattr(k, "secret") for k in keys.api_keys)
    mine = a.account_id
    balance = await stubs.ledger.GetBalance(
        ledger_pb.GetBalanceRequest(account_id=mine), metadata=a.auth
    )
    assert balance.balance.available_micro_credits == 1_000_000
    history = await stubs.ledger.ListTransactions(
        ledger_pb.ListTransactionsRequest(account_id=mine), metadata=a.auth
    )
    assert [t.kind for t in history.transactions] == [ledger_pb.TRANSFER_KIND_TOP_UP]
    updated = await stubs.accounts.UpdateAccount(
        account_pb.UpdateAccountRequest(account_id=mine, email="a@example.com"), metadata=a.auth
    )
    assert updated.account.email == "a@example.com"
    assert updated.account.name == "user"


async def test_admin_operations_need_admin_rights(platform: Platform, stubs: Stubs) -> None:
    user = await new_user(platform, stubs)
    mine = user.account_id
    admin_only = [
        stubs.accounts.CreateAccount(account_pb.CreateAccountRequest(name="x"), metadata=user.auth),
        stubs.accounts.ListAccounts(account_pb.ListAccountsRequest(), metadata=user.auth),
        stubs.accounts.DisableAccount(
            account_pb.DisableAccountRequest(account_id=mine), metadata=user.auth
        ),
        stubs.ledger.TopUp(
            ledger_pb.TopUpRequest(account_id=mine, amount_micro_credits=1, idempotency_key="k"),
            metadata=user.auth,
        ),
        stubs.ledger.CreateHold(
            ledger_pb.CreateHoldRequest(
                account_id=mine, amount_micro_credits=1, idempotency_key="k"
            ),
            metadata=user.auth,
        ),
        stubs.ledger.GetLedgerSummary(ledger_pb.GetLedgerSummaryRequest(), metadata=user.auth),
        stubs.subscriptions.ListSubscriptions(
            sub_pb.ListSubscriptionsRequest(), metadata=user.auth
        ),
        stubs.subscriptions.RenewSubscriptions(
            sub_pb.RenewSubscriptionsRequest(), metadata=user.auth
        ),
        stubs.keys.CreateApiKey(
            key_pb.CreateApiKeyRequest(account_id=mine, scopes=[key_pb.API_KEY_SCOPE_ADMIN]),
            metadata=user.auth,
        ),
    ]
    for call in admin_only:
        await expect_error(call, Code.PERMISSION_DENIED, "PERMISSION_DENIED")

    # An admin-scoped key (issued by the service) reaches every account.
    admin = await new_user(platform, stubs, key_pb.API_KEY_SCOPE_ADMIN)
    got = await stubs.accounts.GetAccount(
        account_pb.GetAccountRequest(account_id=mine), metadata=admin.auth
    )
    assert got.account.account_id == mine
    page = await stubs.accounts.ListAccounts(
        account_pb.ListAccountsRequest(page_size=2), metadata=admin.auth
    )
    assert len(page.accounts) == 2
    assert page.next_page_token
    summary = await stubs.ledger.GetLedgerSummary(
        ledger_pb.GetLedgerSummaryRequest(), metadata=admin.auth
    )
    assert summary.total_debits_micro_credits == summary.total_credits_micro_credits


async def test_missing_wrong_and_inference_only_credentials_are_refused(
    platform: Platform, stubs: Stubs
) -> None:
    inference_only = await new_user(platform, stubs, key_pb.API_KEY_SCOPE_INFERENCE)
    request = ledger_pb.GetBalanceRequest(account_id=inference_only.account_id)
    await expect_error(stubs.ledger.GetBalance(request), Code.UNAUTHENTICATED, "INVALID_API_KEY")
    for credential in ("rst_not-the-token", "rsk_malformed", _altered(inference_only.key)):
        await expect_error(
            stubs.ledger.GetBalance(request, metadata=bearer_metadata(credential)),
            Code.UNAUTHENTICATED,
            "INVALID_API_KEY",
        )
    await expect_error(
        stubs.ledger.GetBalance(request, metadata=inference_only.auth),
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


async def test_only_the_service_token_may_authenticate_api_keys(
    platform: Platform, stubs: Stubs
) -> None:
    """Otherwise anyone could test guessed or stolen keys without making a request."""
    user = await new_user(platform, stubs)
    admin = await new_user(platform, stubs, key_pb.API_KEY_SCOPE_ADMIN)
    request = key_pb.AuthenticateApiKeyRequest(secret=user.key)
    await expect_error(
        stubs.keys.AuthenticateApiKey(request), Code.UNAUTHENTICATED, "INVALID_API_KEY"
    )
    for credential in (user.auth, admin.auth):
        await expect_error(
            stubs.keys.AuthenticateApiKey(request, metadata=credential),
            Code.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    authenticated = await stubs.keys.AuthenticateApiKey(request, metadata=platform.service)
    assert authenticated.api_key.api_key_id == user.key_id


async def test_revoked_expired_and_disabled_keys_stop_at_once(
    platform: Platform, stubs: Stubs
) -> None:
    user = await new_user(platform, stubs)
    await stubs.keys.RevokeApiKey(
        key_pb.RevokeApiKeyRequest(api_key_id=user.key_id), metadata=user.auth
    )
    await expect_error(
        stubs.keys.AuthenticateApiKey(
            key_pb.AuthenticateApiKeyRequest(secret=user.key), metadata=platform.service
        ),
        Code.UNAUTHENTICATED,
        "INVALID_API_KEY",
    )
    expires = Timestamp()
    expires.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    short = await new_user(platform, stubs, expires=expires)
    authenticated = await stubs.keys.AuthenticateApiKey(
        key_pb.AuthenticateApiKeyRequest(secret=short.key), metadata=platform.service
    )
    assert authenticated.api_key.expires == expires
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(seconds=1))
    await expect_error(
        stubs.keys.CreateApiKey(
            key_pb.CreateApiKeyRequest(account_id=short.account_id, expires=past),
            metadata=platform.service,
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    disabled = await new_user(platform, stubs)
    await stubs.accounts.DisableAccount(
        account_pb.DisableAccountRequest(account_id=disabled.account_id),
        metadata=platform.service,
    )
    await expect_error(
        stubs.keys.AuthenticateApiKey(
            key_pb.AuthenticateApiKeyRequest(secret=disabled.key), metadata=platform.service
        ),
        Code.UNAUTHENTICATED,
        "INVALID_API_KEY",
    )


def _chat(model: str) -> cloud_pb.CreateChatCompletionRequest:
    return cloud_pb.CreateChatCompletionRequest(
        params=cloud_pb.ChatCompletionParams(
            model=model,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
        )
    )


async def test_cloud_enforces_the_inference_scope_and_the_model_allow_list(
    platform: Platform, stubs: Stubs
) -> None:
    management_only = await new_user(platform, stubs, key_pb.API_KEY_SCOPE_MANAGEMENT)
    restricted = await new_user(platform, stubs, allowed_models=["some-other-model"])
    for user, model in (
        (management_only, "smollm2-135m-instruct"),
        (restricted, "smollm2-135m-instruct"),
    ):
        await expect_error(
            platform.inference.CreateChatCompletion(_chat(model), metadata=user.auth),
            Code.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    await expect_error(
        platform.inference.ListModels(cloud_pb.ListModelsRequest(), metadata=management_only.auth),
        Code.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    # No hold was taken for the refused requests.
    balance = await platform.balance(restricted)  # type: ignore[arg-type]
    assert (balance.available_micro_credits, balance.held_micro_credits) == (1_000_000, 0)


async def test_only_the_platform_service_binds_a_key_to_a_subcloud(
    platform: Platform, stubs: Stubs
) -> None:
    user = await new_user(platform, stubs)
    admin = await new_user(platform, stubs, key_pb.API_KEY_SCOPE_ADMIN)
    bound = key_pb.CreateApiKeyRequest(account_id=user.account_id, subcloud_id="acme")
    for caller in (user, admin):
        await expect_error(
            stubs.keys.CreateApiKey(bound, metadata=caller.auth),
            Code.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    keys = await stubs.keys.ListApiKeys(
        key_pb.ListApiKeysRequest(account_id=user.account_id), metadata=user.auth
    )
    assert [k.api_key_id for k in keys.api_keys] == [user.key_id]

    issued = await stubs.keys.CreateApiKey(bound, metadata=platform.service)
    assert issued.api_key.subcloud_id == "acme"
    authenticated = await stubs.keys.AuthenticateApiKey(
        key_pb.AuthenticateApiKeyRequest(secret=issued.secret), metadata=platform.service
    )
    assert authenticated.api_key.subcloud_id == "acme"
    assert authenticated.api_key.account_id == user.account_id


async def test_api_keys_are_listed_newest_first_page_by_page(
    platform: Platform, stubs: Stubs
) -> None:
    user = await new_user(platform, stubs)
    created = [user.key_id]
    for name in ("b", "c", "d"):
        issued = await stubs.keys.CreateApiKey(
            key_pb.CreateApiKeyRequest(account_id=user.account_id, name=name), metadata=user.auth
        )
        created.append(issued.api_key.api_key_id)
    listed: list[str] = []
    token = ""
    while True:
        page = await stubs.keys.ListApiKeys(
            key_pb.ListApiKeysRequest(account_id=user.account_id, page_size=3, page_token=token),
            metadata=user.auth,
        )
        assert len(page.api_keys) <= 3
        listed += [key.api_key_id for key in page.api_keys]
        token = page.next_page_token
        if not token:
            break
    assert listed == created[::-1]
    await expect_error(
        stubs.keys.ListApiKeys(
            key_pb.ListApiKeysRequest(account_id=user.account_id, page_token="not a token"),
            metadata=user.auth,
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


def _altered(key: str) -> str:
    """The key with its last character changed (to a different one, always)."""
    return key[:-1] + ("y" if key.endswith("x") else "x")
