"""Over real gRPC, a streamed completion whose caller takes the events ready together
in one message (batch_events) carries exactly the events of one taken one by one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from gateway.convert import single_events
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Platform, running_platform


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


def _events(messages: list[pb.StreamChatCompletionResponse]) -> list[bytes]:
    """Each event as a message of its own, without the fields that differ per request."""
    events = []
    for message in messages:
        for event in single_events(message):
            event.ClearField("id")
            event.ClearField("created")
            events.append(event.SerializeToString(deterministic=True))
    return events


async def test_a_stream_in_batches_carries_the_events_of_one_in_single_events(
    platform: Platform,
) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)
    params = pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
        n=2,
    )

    async def stream(batch_events: bool) -> list[pb.StreamChatCompletionResponse]:
        request = pb.StreamChatCompletionRequest(params=params, batch_events=batch_events)
        call = platform.inference.StreamChatCompletion(request, metadata=customer.metadata)
        return [message async for message in call]

    batched = await stream(batch_events=True)
    single = await stream(batch_events=False)

    assert _events(batched) == _events(single)
    assert all(len(message.choices) + message.HasField("usage") == 1 for message in single)
    assert len(batched) <= len(single)
    assert batched[-1].HasField("usage")
    assert not any(message.HasField("usage") for message in batched[:-1])
