"""Changes in the account layer reach cloud's key cache at once, not after its TTL:
the account layer announces them and cloud drops the cached entries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import rate_limits_pb2 as rate_limits_pb
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Customer, Platform, running_platform


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        await running.start_agent(ScriptedRuntime())
        yield running


def _request() -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        params=pb.ChatCompletionParams(
            model=SMOLLM2_135M.id,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
            max_tokens=2,
        )
    )


async def _refusal(platform: Platform, customer: Customer) -> grpc.StatusCode | None:
    try:
        await platform.inference.CreateChatCompletion(_request(), metadata=customer.metadata)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return None


async def _key_id(platform: Platform, customer: Customer) -> str:
    listed = await keys_grpc.ApiKeyServiceStub(platform.channel).ListApiKeys(
        keys_pb.ListApiKeysRequest(account_id=customer.account_id), metadata=platform.service
    )
    [key] = listed.api_keys
    return key.api_key_id


async def test_a_revoked_key_is_refused_at_once(platform: Platform) -> None:
    customer = await platform.customer(credits=1_000_000)
    assert await _refusal(platform, customer) is None  # the key is now cached
    await keys_grpc.ApiKeyServiceStub(platform.channel).RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(api_key_id=await _key_id(platform, customer)),
        metadata=platform.service,
    )
    assert await _refusal(platform, customer) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_disabled_account_is_refused_at_once(platform: Platform) -> None:
    customer = await platform.customer(credits=1_000_000)
    assert await _refusal(platform, customer) is None
    await account_grpc.AccountServiceStub(platform.channel).DisableAccount(
        account_pb.DisableAccountRequest(account_id=customer.account_id),
        metadata=platform.service,
    )
    assert await _refusal(platform, customer) == grpc.StatusCode.UNAUTHENTICATED


async def test_changed_account_limits_apply_to_a_cached_key(platform: Platform) -> None:
    customer = await platform.customer(credits=1_000_000)
    assert await _refusal(platform, customer) is None  # unlimited, and cached
    await account_grpc.AccountServiceStub(platform.channel).SetAccountRateLimits(
        account_pb.SetAccountRateLimitsRequest(
            account_id=customer.account_id,
            rate_limits=rate_limits_pb.RateLimits(requests_per_minute=1),
        ),
        metadata=platform.service,
    )
    assert await _refusal(platform, customer) is None
    assert await _refusal(platform, customer) == grpc.StatusCode.RESOURCE_EXHAUSTED
