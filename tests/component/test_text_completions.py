"""Text completions and single-model lookups over real gRPC down to a scripted node."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from core.grpc_errors import error_info
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime, scripted_tokens
from tests.harness import Platform, running_platform

PRICE = SMOLLM2_135M.price


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


def _charge(prompt: int, completion: int) -> int:
    return prompt * PRICE.prompt + completion * PRICE.completion


def _params(*prompts: str, **fields: object) -> pb.CompletionParams:
    return pb.CompletionParams(model=SMOLLM2_135M.id, prompts=prompts, **fields)  # type: ignore[arg-type]


async def test_each_prompt_is_completed_as_it_is_and_billed(platform: Platform) -> None:
    agent = await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    response = await platform.inference.CreateCompletion(
        pb.CreateCompletionRequest(params=_params("once upon a time", "hello", max_tokens=3)),
        metadata=customer.metadata,
    )

    assert response.id.startswith("cmpl-")
    first_three = "".join(scripted_tokens(DEFAULT_SCRIPT)[:3])
    assert [(c.index, c.text) for c in response.choices] == [(0, first_three), (1, first_three)]
    assert {c.finish_reason for c in response.choices} == {common_pb.FINISH_REASON_LENGTH}
    # A raw prompt is one token per word plus BOS in the scripted runtime: 5 + 2.
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (7, 6)
    assert response.billing.charged_micro_credits == _charge(7, 6)
    balance = await platform.balance(customer)
    assert balance.available_micro_credits == 1_000_000 - _charge(7, 6)
    assert balance.held_micro_credits == 0
    jobs = agent.runtime.started_jobs  # type: ignore[attr-defined]
    assert [(job.prompt, job.messages) for job in jobs] == [("once upon a time", ()), ("hello", ())]


async def test_stream_opens_with_an_empty_message_then_text_then_usage(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    messages = [
        message
        async for message in platform.inference.StreamCompletion(
            pb.StreamCompletionRequest(params=_params("hi", max_tokens=2)),
            metadata=customer.metadata,
        )
    ]

    assert not messages[0].choices
    assert not messages[0].HasField("usage")
    assert [m.choices[0].text for m in messages[1:-2]] == scripted_tokens(DEFAULT_SCRIPT)[:2]
    assert messages[-2].choices[0].finish_reason == common_pb.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 2
    assert len({m.id for m in messages}) == 1


async def _invalid_field(platform: Platform, params: pb.CompletionParams) -> str:
    customer = await platform.customer(credits=1_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.inference.CreateCompletion(
            pb.CreateCompletionRequest(params=params), metadata=customer.metadata
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None
    return info.metadata["field"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (_params(), "prompt"),
        (_params("a", ""), "prompt"),
        (_params("a", "b", "c", n=3), "n"),
    ],
)
async def test_bad_prompts_are_refused(
    platform: Platform, params: pb.CompletionParams, field: str
) -> None:
    await platform.start_agent(ScriptedRuntime())
    assert await _invalid_field(platform, params) == field


async def test_get_model(platform: Platform) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=0)

    found = await platform.inference.GetModel(
        pb.GetModelRequest(model=SMOLLM2_135M.id), metadata=customer.metadata
    )
    assert found.model.id == SMOLLM2_135M.id
    assert found.model.context_length == SMOLLM2_135M.context_length

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.inference.GetModel(
            pb.GetModelRequest(model="no-such-model"), metadata=customer.metadata
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
