"""Hostile requests cost the platform a check of their bytes: refused at cloud with the
field named, and refused again by the node if they get past cloud."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.session import AgentSession, SessionSettings
from core import channels
from core.convert.generation import spec_to_pb
from core.grpc_errors import error_info
from core.inference import (
    ChatMessage,
    ChatRole,
    GenerationSpec,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
)
from core.request_limits import SCHEMA_FIELD
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import Platform, running_platform, start_network

HUGE_ARRAY = '{"type":"array","items":{"type":"integer"},"maxItems":100000}'
EMPTY = common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="")


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (pb.ChatCompletionParams(model=SMOLLM2_135M.id, messages=[EMPTY] * 100_000), "messages"),
        (
            pb.ChatCompletionParams(
                model=SMOLLM2_135M.id,
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
                response_format=common_pb.ResponseFormat(
                    type=common_pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=HUGE_ARRAY
                ),
            ),
            SCHEMA_FIELD,
        ),
    ],
)
async def test_cloud_refuses_before_any_hold_or_node_work(
    platform: Platform, params: pb.ChatCompletionParams, field: str
) -> None:
    agent = await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.inference.CreateChatCompletion(
            pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
        )

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None
    assert dict(info.metadata) == {"field": field}
    assert agent.runtime.started_jobs == []  # type: ignore[attr-defined]
    assert (await platform.balance(customer)).available_micro_credits == 1_000_000


def _spec(messages: tuple[ChatMessage, ...], schema: str = "") -> GenerationSpec:
    return GenerationSpec(
        model=MODEL_ID,
        messages=messages,
        sampling=Sampling(
            max_tokens=8,
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)
            if schema
            else None,
        ),
        max_prompt_tokens=2047,
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (_spec((ChatMessage(ChatRole.USER, ""),) * 100_000), "messages"),
        (_spec((ChatMessage(ChatRole.USER, "hi"),), HUGE_ARRAY), SCHEMA_FIELD),
    ],
)
async def test_the_node_refuses_what_gets_past_cloud_without_running_it(
    postgres_dsn: str, spec: GenerationSpec, field: str
) -> None:
    """Straight to the network (as a caller that skipped cloud's checks would be)."""
    network = await start_network(postgres_dsn)
    runtime = ScriptedRuntime()
    session = AgentSession(SessionSettings(network.target, "node"), runtime)
    agent = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        async with channels.insecure_channel(network.target) as channel:
            call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
                dispatch_pb.RunJobRequest(job_id="hostile", spec=spec_to_pb(spec)),
                metadata=network.service,
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                _ = [event async for event in call]
    finally:
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent
        await network.stop()

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(raised.value)
    assert info is not None
    assert dict(info.metadata) == {"field": field}
    assert runtime.started_jobs == []
