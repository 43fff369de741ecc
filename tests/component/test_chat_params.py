"""Chat parameters beyond the basics, over real gRPC down to a scripted node:
several choices, penalties, logprobs and response formats."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from core.grpc_errors import error_info
from core.inference import ResponseFormat, ResponseFormatType
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import (
    DEFAULT_SCRIPT,
    SCRIPTED_LOGPROB,
    ScriptedRuntime,
    scripted_tokens,
)
from tests.harness import Platform, running_platform

PRICE = SMOLLM2_135M.price


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


def _params(**fields: object) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
        **fields,  # type: ignore[arg-type]
    )


def _charge(prompt: int, completion: int) -> int:
    return prompt * PRICE.prompt + completion * PRICE.completion


async def test_several_choices_are_separate_jobs_billed_as_their_sum(platform: Platform) -> None:
    agent = await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_params(n=3)), metadata=customer.metadata
    )

    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert {choice.message.content for choice in response.choices} == {DEFAULT_SCRIPT}
    # Each choice processes the prompt (4 tokens) and generates 10.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (12, 30)
    assert response.billing.charged_micro_credits == _charge(12, 30)
    balance = await platform.balance(customer)
    assert balance.available_micro_credits == 1_000_000 - _charge(12, 30)
    assert balance.held_micro_credits == 0
    assert len(agent.runtime.started_jobs) == 3  # type: ignore[attr-defined]


async def test_streamed_choices_each_open_with_the_role_and_end_with_a_reason(
    platform: Platform,
) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    messages = [
        message
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=_params(n=2, max_tokens=2)),
            metadata=customer.metadata,
        )
    ]

    deltas = [(m.choices[0].index, m.choices[0]) for m in messages if m.choices]
    expected_texts = scripted_tokens(DEFAULT_SCRIPT)[:2]
    for index in (0, 1):
        mine = [delta for i, delta in deltas if i == index]
        assert mine[0].role == common_pb.CHAT_ROLE_ASSISTANT
        assert [delta.content for delta in mine[1:-1]] == expected_texts
        assert [delta.finish_reason for delta in mine[:-1]] == [0] * (len(mine) - 1)
        assert mine[-1].finish_reason == common_pb.FINISH_REASON_LENGTH
    assert [i for i, _ in deltas] == sorted(i for i, _ in deltas)  # one choice after the other
    assert not messages[-1].choices
    assert messages[-1].usage.completion_tokens == 4
    assert messages[-1].billing.charged_micro_credits == _charge(8, 4)


async def test_sampling_parameters_reach_the_node(platform: Platform) -> None:
    agent = await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)
    schema = '{"type": "object"}'
    params = _params(
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logprobs=True,
        top_logprobs=4,
        response_format=common_pb.ResponseFormat(
            type=common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=schema
        ),
    )

    await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
    )

    [job] = agent.runtime.started_jobs  # type: ignore[attr-defined]
    sampling = job.sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert (sampling.logprobs, sampling.top_logprobs) == (True, 4)
    assert sampling.response_format == ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)


async def test_unset_parameters_stay_unset_on_the_node(platform: Platform) -> None:
    agent = await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_params()), metadata=customer.metadata
    )

    [job] = agent.runtime.started_jobs  # type: ignore[attr-defined]
    sampling = job.sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (None, None)
    assert (sampling.logprobs, sampling.response_format) == (False, None)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {
                "response_format": common_pb.ResponseFormat(
                    type=common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[1]"
                )
            },
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_out_of_range_parameters_are_refused_before_any_hold(
    platform: Platform, fields: dict[str, object], field: str
) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=_params(**fields)), metadata=customer.metadata
        )

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None
    assert dict(info.metadata) == {"field": field}
    assert (await platform.balance(customer)).available_micro_credits == 1_000_000


async def test_logprobs_travel_from_the_node_to_the_caller(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)
    params = _params(max_tokens=3, logprobs=True, top_logprobs=2)

    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
    )
    streamed = [
        message
        async for message in platform.inference.StreamChatCompletion(
            pb.StreamChatCompletionRequest(params=params), metadata=customer.metadata
        )
    ]

    tokens = scripted_tokens(DEFAULT_SCRIPT)[:3]
    [choice] = response.choices
    assert [item.token for item in choice.logprobs] == tokens
    assert [item.bytes for item in choice.logprobs] == [token.encode() for token in tokens]
    assert {item.logprob for item in choice.logprobs} == {SCRIPTED_LOGPROB}
    assert [[top.logprob for top in item.top_logprobs] for item in choice.logprobs] == [
        [SCRIPTED_LOGPROB, SCRIPTED_LOGPROB - 1]
    ] * 3
    deltas = [delta for message in streamed for delta in message.choices]
    assert [item.token for delta in deltas for item in delta.logprobs] == tokens
    # Each content delta carries exactly its own tokens' logprobs (the agent may
    # merge several tokens into one delta).
    assert all("".join(item.token for item in delta.logprobs) == delta.content for delta in deltas)


async def test_no_logprobs_unless_asked_for(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=_params(max_tokens=2)), metadata=customer.metadata
    )

    assert not response.choices[0].logprobs
