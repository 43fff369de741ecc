"""The path of a request over real gRPC: cloud -> account + network -> agent.

The agent runs a scripted runtime (tests/doubles) so texts, token counts and
charges are exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from resultity.account.v1.contribution_service_pb2 import ListContributionsRequest
from resultity.account.v1.contribution_service_pb2_grpc import ContributionServiceStub
from resultity.account.v1.ledger_service_pb2 import GetBalanceRequest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from agent.batching import MAX_BATCH_TOKENS
from agent.runtime.base import GenerationEvent, GenerationRequest
from core.grpc_errors import error_info
from core.inference import ToolCall
from core.tool_calls import render_calls
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime, scripted_tokens
from tests.harness import Customer, Platform, eventually, running_platform

PRICE = SMOLLM2_135M.price


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


def _params(max_tokens: int | None = None, content: str = "hello there") -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content=content)],
        max_tokens=max_tokens,
    )


def _charge(prompt: int, completion: int) -> int:
    return prompt * PRICE.prompt + completion * PRICE.completion


async def test_completion_returns_the_generated_text_and_bills_exactly(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_params()), metadata=customer.metadata
    )

    assert response.choices[0].message.content == DEFAULT_SCRIPT
    assert response.choices[0].finish_reason == common_pb.FINISH_REASON_STOP
    # "hello there" is 2 words + 2 template tokens in the scripted runtime.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 10)
    assert response.billing.charged_micro_credits == _charge(4, 10)
    balance = await platform.balance(customer)
    assert balance.available_micro_credits == 1_000_000 - _charge(4, 10)
    assert balance.held_micro_credits == 0


async def test_stream_sends_role_then_content_then_finish_then_usage(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    messages = [
        message
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=_params(max_tokens=3)),
            metadata=customer.metadata,
        )
    ]

    assert messages[0].choices[0].role == common_pb.CHAT_ROLE_ASSISTANT
    contents = [m.choices[0].content for m in messages[1:-2]]
    assert contents == scripted_tokens(DEFAULT_SCRIPT)[:3]
    assert messages[-2].choices[0].finish_reason == common_pb.FINISH_REASON_LENGTH
    assert not messages[-1].choices
    assert messages[-1].usage.completion_tokens == 3
    assert messages[-1].billing.charged_micro_credits == _charge(4, 3)
    assert len({m.id for m in messages}) == 1


WEATHER = common_pb.FunctionTool(
    name="get_weather",
    parameters='{"type": "object", "properties": {"city": {"type": "string"}}}',
)
CALL_BLOCK = render_calls([ToolCall("", "get_weather", '{"city": "Paris"}')])


def _tool_params() -> pb.ChatCompletionParams:
    params = _params(content="weather in Paris?")
    params.tools.append(WEATHER)
    params.tool_choice.mode = common_pb.TOOL_CHOICE_MODE_REQUIRED
    return params


async def test_tool_calls_reach_grpc_callers_whole_and_streamed(platform: Platform) -> None:
    runtime = ScriptedRuntime(tool_answers={"weather in Paris?": CALL_BLOCK})
    await platform.start_agent(runtime)
    customer = await platform.customer(credits=1_000_000)

    whole = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_tool_params()), metadata=customer.metadata
    )
    streamed = [
        message
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=_tool_params()), metadata=customer.metadata
        )
    ]

    [call] = whole.choices[0].message.tool_calls
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.id.startswith("call_")
    assert whole.choices[0].finish_reason == common_pb.FINISH_REASON_TOOL_CALLS
    # Billed as generated: every token of the block.
    tokens = len(scripted_tokens(CALL_BLOCK))
    assert whole.usage.completion_tokens == tokens
    pieces = [call for m in streamed for choice in m.choices for call in choice.tool_calls]
    assert (pieces[0].index, pieces[0].name, pieces[0].arguments) == (0, "get_weather", "")
    assert pieces[0].id.startswith("call_")
    assert all(not piece.id and not piece.name for piece in pieces[1:])
    assert "".join(piece.arguments for piece in pieces) == '{"city": "Paris"}'
    assert streamed[-2].choices[0].finish_reason == common_pb.FINISH_REASON_TOOL_CALLS
    assert streamed[-1].usage.completion_tokens == tokens
    assert [job.tool_use is not None for job in runtime.started_jobs] == [True, True]


async def test_tool_choice_without_tools_is_invalid(platform: Platform) -> None:
    customer = await platform.customer(credits=1_000)
    params = _params()
    params.tool_choice.mode = common_pb.TOOL_CHOICE_MODE_AUTO
    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(_details(error).metadata) == {"field": "tool_choice"}


def _details(error: grpc.aio.AioRpcError) -> ErrorInfo:
    info = error_info(error)
    assert info is not None
    return info


def _reason(error: grpc.aio.AioRpcError) -> str:
    return _details(error).reason


async def _rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


async def test_unknown_key_is_unauthenticated(platform: Platform) -> None:
    call = platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_params()),
        metadata=(("authorization", "Bearer rsk_not-a-real-key"),),
    )
    error = await _rpc_error(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(error) == "INVALID_API_KEY"


async def test_unknown_model_is_not_found(platform: Platform) -> None:
    customer = await platform.customer(credits=1_000)
    params = _params()
    params.model = "no-such-model"
    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert _reason(error) == "MODEL_NOT_FOUND"


async def test_no_serving_node_is_unavailable_and_costs_nothing(platform: Platform) -> None:
    customer = await platform.customer(credits=1_000_000)
    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=_params()), metadata=customer.metadata
        )
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(error) == "NO_CAPACITY"
    assert (await platform.balance(customer)).available_micro_credits == 1_000_000


async def test_insufficient_credit_is_refused_before_running(platform: Platform) -> None:
    runtime = ScriptedRuntime()
    await platform.start_agent(runtime)
    customer = await platform.customer(credits=10)

    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=_params(max_tokens=100)),
            metadata=customer.metadata,
        )
    )

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(error) == "INSUFFICIENT_QUOTA"
    assert runtime.started_jobs == []
    assert (await platform.balance(customer)).available_micro_credits == 10


async def test_invalid_parameters_name_the_field(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)
    params = _params(max_tokens=SMOLLM2_135M.context_length + 1)
    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(error).metadata["field"] == "max_tokens"


async def test_cancelled_stream_stops_the_job_and_bills_what_was_delivered(
    platform: Platform,
) -> None:
    runtime = ScriptedRuntime(script=" ".join(["word"] * 500), token_delay_s=0.01)
    await platform.start_agent(runtime)
    customer = await platform.customer(credits=1_000_000)

    call = platform.inference.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=_params()), metadata=customer.metadata
    )
    received = 0
    async for message in call:
        if message.choices and message.choices[0].content:
            received += 1
            if received == 5:
                break
    call.cancel()

    await eventually(lambda: runtime.cancelled_jobs == 1)
    await eventually(lambda: not platform.network.service.nodes()[0].active_jobs)

    async with asyncio.timeout(10):
        while (await platform.balance(customer)).held_micro_credits:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    charged = 1_000_000 - (await platform.balance(customer)).available_micro_credits
    # Delivered tokens are at least what we read; at most a few more were in flight.
    delivered = (charged - 4 * PRICE.prompt) // PRICE.completion
    assert charged == _charge(4, delivered)
    assert 5 <= delivered < 500


async def test_jobs_go_to_the_least_loaded_node(platform: Platform) -> None:
    slow = " ".join(["word"] * 50)
    first, second = (
        ScriptedRuntime(script=slow, token_delay_s=0.01),
        ScriptedRuntime(script=slow, token_delay_s=0.01),
    )
    await platform.start_agent(first, name="a")
    await platform.start_agent(second, name="b")
    customer = await platform.customer(credits=1_000_000)

    await asyncio.gather(
        *(
            platform.inference.CreateChatCompletion(
                pb.CreateChatCompletionRequest(params=_params()), metadata=customer.metadata
            )
            for _ in range(4)
        )
    )

    assert len(first.started_jobs) == 2
    assert len(second.started_jobs) == 2


async def test_node_lost_mid_job_fails_cleanly_and_bills_only_delivered(
    platform: Platform,
) -> None:
    runtime = ScriptedRuntime(script=" ".join(["word"] * 500), token_delay_s=0.01)
    agent = await platform.start_agent(runtime)
    customer = await platform.customer(credits=1_000_000)

    call = platform.inference.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=_params()), metadata=customer.metadata
    )

    async def read_and_kill_node_after_three_tokens() -> None:
        received = 0
        async for message in call:
            if message.choices and message.choices[0].content:
                received += 1
                if received == 3:
                    await agent.stop()

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read_and_kill_node_after_three_tokens()

    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert _reason(raised.value) == "JOB_FAILED"
    balance = await platform.balance(customer)
    assert balance.held_micro_credits == 0
    charged = 1_000_000 - balance.available_micro_credits
    delivered = (charged - 4 * PRICE.prompt) // PRICE.completion
    assert charged == _charge(4, delivered)
    assert delivered >= 3


async def test_runtime_failure_is_reported_as_a_failed_job(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime(fail_after=2))
    customer: Customer = await platform.customer(credits=1_000_000)
    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=_params()), metadata=customer.metadata
        )
    )
    assert error.code() == grpc.StatusCode.ABORTED
    balance = await platform.balance(customer)
    assert balance.held_micro_credits == 0
    assert balance.available_micro_credits == 1_000_000 - _charge(4, 2)


async def test_the_nodes_operator_earns_its_share_and_a_contribution_record(
    platform: Platform,
) -> None:
    operator_id, token = await platform.operator()
    await platform.start_agent(ScriptedRuntime(), node_token=token)
    customer = await platform.customer(credits=1_000_000)

    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_params()), metadata=customer.metadata
    )

    charged = response.billing.charged_micro_credits
    assert charged == _charge(4, 10)
    records = await ContributionServiceStub(platform.channel).ListContributions(
        ListContributionsRequest(operator_account_id=operator_id), metadata=platform.service
    )
    [record] = records.contributions
    assert record.tokens == 4 + 10
    assert record.model == SMOLLM2_135M.id
    # The operators' share is 80% of the capture, rounded down; the platform keeps the rest.
    assert record.amount_micro_credits == charged * 8000 // 10_000
    earned = await platform.ledger.GetBalance(
        GetBalanceRequest(account_id=operator_id), metadata=platform.service
    )
    assert earned.balance.earned_micro_credits == record.amount_micro_credits


class _FailsItsSecondJob(ScriptedRuntime):
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.started_jobs:
            self.fail_after = 2
        async for event in super().generate(request):
            yield event


async def test_a_failed_request_still_credits_the_operator_for_the_finished_choices(
    platform: Platform,
) -> None:
    operator_id, token = await platform.operator()
    await platform.start_agent(_FailsItsSecondJob(), node_token=token)
    customer = await platform.customer(credits=1_000_000)
    params = _params()
    params.n = 2

    error = await _rpc_error(
        platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
        )
    )

    assert error.code() == grpc.StatusCode.ABORTED
    # Both choices are billed: the first finished (4 + 10 tokens), the second
    # failed after 2 tokens, before its node reported usage.
    charged = _charge(4, 10) + _charge(4, 2)
    balance = await platform.balance(customer)
    assert (balance.available_micro_credits, balance.held_micro_credits) == (
        1_000_000 - charged,
        0,
    )
    records = await ContributionServiceStub(platform.channel).ListContributions(
        ListContributionsRequest(operator_account_id=operator_id), metadata=platform.service
    )
    [record] = records.contributions
    assert record.tokens == 14
    # The operator earns 14 of the 20 billed tokens' part of the operators' share;
    # the failed choice's part goes to the platform.
    assert record.amount_micro_credits == charged * 8000 // 10_000 * 14 // 20
    earned = await platform.ledger.GetBalance(
        GetBalanceRequest(account_id=operator_id), metadata=platform.service
    )
    assert earned.balance.earned_micro_credits == record.amount_micro_credits


async def test_fast_tokens_travel_in_fewer_messages_with_nothing_lost(platform: Platform) -> None:
    # A scripted runtime produces all its tokens at once: the agent's default
    # batching sends the first alone and merges the rest.
    await platform.start_agent(ScriptedRuntime(), batch_tokens=MAX_BATCH_TOKENS)
    customer = await platform.customer(credits=1_000_000)

    messages = [
        message
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=_params()), metadata=customer.metadata
        )
    ]

    contents = [m.choices[0].content for m in messages if m.choices and m.choices[0].content]
    assert "".join(contents) == DEFAULT_SCRIPT
    assert contents[0] == scripted_tokens(DEFAULT_SCRIPT)[0]
    assert len(contents) < len(scripted_tokens(DEFAULT_SCRIPT))
    assert messages[-1].usage.completion_tokens == 10
    assert messages[-1].billing.charged_micro_credits == _charge(4, 10)
