"""The Responses API's streamed events, rendered as plain data: what their models
(and so the OpenAPI document) serialise."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic_core import to_json
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from gateway.errors import ApiError
from gateway.responses_convert import ResponseEvents
from gateway.responses_schemas import ResponseRequest, ResponseStreamEvent, StreamEventData


def _message(
    *choices: pb.ChatCompletionDelta, usage: bool = False
) -> pb.StreamChatCompletionResponse:
    return pb.StreamChatCompletionResponse(
        id="chatcmpl-1",
        model="m",
        created=Timestamp(seconds=5),
        choices=choices,
        usage=inference_pb2.Usage(prompt_tokens=2, completion_tokens=3) if usage else None,
    )


def test_events_are_what_their_models_serialise() -> None:
    request = ResponseRequest.model_validate(
        {
            "model": "m",
            "input": "hi",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        }
    )
    rendered: list[StreamEventData] = []

    def keep(event: StreamEventData) -> bytes:
        rendered.append(event)
        return b""

    events = ResponseEvents(request, keep)
    events.render(_message(pb.ChatCompletionDelta(role=inference_pb2.CHAT_ROLE_ASSISTANT)))
    events.render(
        _message(
            pb.ChatCompletionDelta(content='"Hé"\n'),
            pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(id="call_1", name="f")]),
            pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(arguments='{"a": 1}')]),
            pb.ChatCompletionDelta(finish_reason=inference_pb2.FINISH_REASON_LENGTH),
        )
    )
    events.render(_message(usage=True))
    events.failed(ApiError(429, "slow down", "requests", code="rate_limit_exceeded"))

    assert {event["type"] for event in rendered} == {
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.incomplete",
        "error",
        "response.failed",
    }
    for event in rendered:
        data = to_json(event)
        assert ResponseStreamEvent.model_validate_json(data).model_dump_json().encode() == data
