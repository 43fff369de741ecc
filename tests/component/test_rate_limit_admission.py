"""Rate-limit admission under a burst, over real gRPC: cloud refuses what is over
the limits before taking a hold, and reports the limits' state to callers."""

from __future__ import annotations

import asyncio
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

from core.grpc_errors import error_info
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Platform, running_platform

REQUESTS_PER_MINUTE = 3
LIMITED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
async def platform(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    # Cloud reads its limits from the environment when none are passed.
    monkeypatch.setenv("RESULTITY_RATE_LIMIT_KEY_REQUESTS_PER_MINUTE", str(REQUESTS_PER_MINUTE))
    monkeypatch.setenv("RESULTITY_RATE_LIMIT_KEY_TOKENS_PER_MINUTE", "1000000")
    async with running_platform(postgres_dsn) as running:
        yield running


def _request() -> pb.CreateChatCompletionRequest:
    return pb.CreateChatCompletionRequest(
        params=pb.ChatCompletionParams(
            model=SMOLLM2_135M.id,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
            max_tokens=2,
        )
    )


async def test_a_burst_gets_exactly_the_limit_through(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime(slot_count=4))
    customer = await platform.customer(credits=1_000_000)

    async def call() -> pb.CreateChatCompletionResponse | grpc.aio.AioRpcError:
        try:
            return await platform.inference.CreateChatCompletion(
                _request(), metadata=customer.metadata
            )
        except grpc.aio.AioRpcError as error:
            return error

    outcomes = await asyncio.gather(*(call() for _ in range(10)))

    served = [o for o in outcomes if isinstance(o, pb.CreateChatCompletionResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(served) == REQUESTS_PER_MINUTE
    assert len(refused) == 10 - REQUESTS_PER_MINUTE
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(error)
        assert info is not None
        assert info.reason == "RATE_LIMITED"
        assert int(info.metadata["retry_after_s"]) >= 1
        assert info.metadata["x-ratelimit-remaining-requests"] == "0"
    # Refused requests took no hold and cost nothing.
    balance = await platform.balance(customer)
    assert balance.held_micro_credits == 0
    charged = sum(response.billing.charged_micro_credits for response in served)
    assert balance.available_micro_credits == 1_000_000 - charged


async def test_served_requests_report_the_limits_in_initial_metadata(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    call = platform.inference.CreateChatCompletion(_request(), metadata=customer.metadata)
    await call
    unary = dict(await call.initial_metadata())
    stream = platform.inference.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=_request().params), metadata=customer.metadata
    )
    _ = [message async for message in stream]
    streamed = dict(await stream.initial_metadata())

    assert unary["x-ratelimit-limit-requests"] == str(REQUESTS_PER_MINUTE)
    assert unary["x-ratelimit-remaining-requests"] == str(REQUESTS_PER_MINUTE - 1)
    assert streamed["x-ratelimit-remaining-requests"] == str(REQUESTS_PER_MINUTE - 2)
    assert unary["x-ratelimit-limit-tokens"] == "1000000"
    # The reservation is the worst case: prompt bound plus max_tokens.
    assert int(unary["x-ratelimit-remaining-tokens"]) < 1_000_000


async def test_limits_stored_with_keys_and_accounts_apply(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime(slot_count=4))
    customer = await platform.customer(credits=1_000_000)
    keys = keys_grpc.ApiKeyServiceStub(platform.channel)
    accounts = account_grpc.AccountServiceStub(platform.channel)

    async def key(**fields: object) -> tuple[tuple[str, str], ...]:
        issued = await keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(account_id=customer.account_id, **fields),
            metadata=platform.service,
        )
        return (("authorization", f"Bearer {issued.secret}"),)

    async def served(metadata: tuple[tuple[str, str], ...]) -> bool | grpc.StatusCode:
        try:
            await platform.inference.CreateChatCompletion(_request(), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return True

    # A key's own limit replaces the default of 3 per minute.
    tight = await key(name="tight", rate_limits=rate_limits_pb.RateLimits(requests_per_minute=1))
    assert [await served(tight) for _ in range(2)] == [True, LIMITED]

    # An admin limits the whole account: a fresh key (default 3) gets only 2.
    updated = await accounts.SetAccountRateLimits(
        account_pb.SetAccountRateLimitsRequest(
            account_id=customer.account_id,
            rate_limits=rate_limits_pb.RateLimits(requests_per_minute=2),
        ),
        metadata=platform.service,
    )
    assert updated.account.rate_limits.requests_per_minute == 2
    fresh = await key(name="fresh")
    assert [await served(fresh) for _ in range(3)] == [True, True, LIMITED]

    # Only admins set account limits, and only to positive values.
    manager = await key(name="manage", scopes=[keys_pb.API_KEY_SCOPE_MANAGEMENT])
    for metadata, limits, code in (
        (manager, rate_limits_pb.RateLimits(), grpc.StatusCode.PERMISSION_DENIED),
        (
            platform.service,
            rate_limits_pb.RateLimits(concurrent_requests=0),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await accounts.SetAccountRateLimits(
                account_pb.SetAccountRateLimitsRequest(
                    account_id=customer.account_id, rate_limits=limits
                ),
                metadata=metadata,
            )
        assert raised.value.code() == code
