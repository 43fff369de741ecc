"""OpenAI JSON <-> cloud protobuf conversions."""

from __future__ import annotations

import json

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic_core import to_json
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from gateway import convert
from gateway.schemas import ChatCompletionChunk, ChatCompletionRequest, TextCompletion


def _request(**fields: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def test_params_carry_every_field() -> None:
    request = _request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok"},
        ],
        max_tokens=5,
        temperature=0.2,
        top_p=0.5,
        stop=["x", "y"],
        seed=-3,
        user="end-user",
    )

    assert convert.params_from_request(request) == pb.ChatCompletionParams(
        model="m",
        messages=[
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_SYSTEM, content="Be brief."),
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content="a\nb"),
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_ASSISTANT, content="ok"),
        ],
        max_tokens=5,
        temperature=0.2,
        top_p=0.5,
        stop=["x", "y"],
        seed=-3,
        user="end-user",
    )


def test_absent_options_stay_unset() -> None:
    params = convert.params_from_request(_request())

    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not params.HasField(name), name
    assert list(params.stop) == []
    assert params.user == ""


def test_zero_valued_options_are_set() -> None:
    params = convert.params_from_request(_request(temperature=0, seed=0))

    assert params.HasField("temperature")
    assert params.HasField("seed")


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    params = convert.params_from_request(_request(max_tokens=5, max_completion_tokens=9))

    assert params.max_tokens == 9


def test_single_stop_string_becomes_a_list() -> None:
    assert list(convert.params_from_request(_request(stop="END")).stop) == ["END"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (inference_pb2.FINISH_REASON_UNSPECIFIED, None),
        (inference_pb2.FINISH_REASON_STOP, "stop"),
        (inference_pb2.FINISH_REASON_LENGTH, "length"),
        (inference_pb2.FINISH_REASON_CANCELLED, "stop"),
    ],
)
def test_finish_reason(value: inference_pb2.FinishReason.ValueType, expected: str | None) -> None:
    assert convert.finish_reason(value) == expected


def test_chat_completion() -> None:
    response = pb.CreateChatCompletionResponse(
        id="c-1",
        model="m",
        created=Timestamp(seconds=1_700_000_000),
        choices=[
            pb.ChatCompletionChoice(
                index=0,
                message=inference_pb2.ChatMessage(
                    role=inference_pb2.CHAT_ROLE_ASSISTANT, content="Hi!"
                ),
                finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            )
        ],
        usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=4),
        billing=pb.Billing(charged_micro_credits=10),
    )

    assert convert.chat_completion_from_proto(response).model_dump(mode="json") == {
        "id": "c-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def _stream_message(
    choices: list[pb.ChatCompletionDelta] | None = None, usage: inference_pb2.Usage | None = None
) -> pb.StreamChatCompletionResponse:
    return pb.StreamChatCompletionResponse(
        id="c-1", model="m", created=Timestamp(seconds=5), choices=choices, usage=usage
    )


@pytest.mark.parametrize(
    ("delta", "expected_delta", "expected_finish"),
    [
        (
            pb.ChatCompletionDelta(role=inference_pb2.CHAT_ROLE_ASSISTANT),
            {"role": "assistant", "content": ""},
            None,
        ),
        (pb.ChatCompletionDelta(content="Hel"), {"content": "Hel"}, None),
        (pb.ChatCompletionDelta(finish_reason=inference_pb2.FINISH_REASON_STOP), {}, "stop"),
    ],
)
def test_chunk_deltas(
    delta: pb.ChatCompletionDelta, expected_delta: dict[str, str], expected_finish: str | None
) -> None:
    chunk = convert.chunk_from_proto(_stream_message(choices=[delta]))

    assert json.loads(to_json(chunk)) == {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": expected_delta,
                "logprobs": None,
                "finish_reason": expected_finish,
            }
        ],
        "usage": None,
    }


def test_usage_chunk() -> None:
    message = _stream_message(usage=inference_pb2.Usage(prompt_tokens=2, completion_tokens=3))

    chunk = json.loads(to_json(convert.chunk_from_proto(message)))

    assert convert.is_usage_only(message)
    assert chunk["choices"] == []
    assert chunk["usage"]["total_tokens"] == 5


def test_chunks_are_what_the_chunk_model_serialises() -> None:
    # The stream renders chunks as plain data; the model (and the OpenAPI document) is
    # the contract they keep.
    logprobs = [inference_pb2.TokenLogprob(token="Hé", logprob=-0.25, bytes=b"H\xc3\xa9")]
    deltas = [
        pb.ChatCompletionDelta(role=inference_pb2.CHAT_ROLE_ASSISTANT),
        pb.ChatCompletionDelta(index=1, content='"Hé"\n', logprobs=logprobs),
        pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(id="call_1", name="f")]),
        pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(arguments='{"a": 1}')]),
        pb.ChatCompletionDelta(finish_reason=inference_pb2.FINISH_REASON_STOP),
    ]
    usage = inference_pb2.Usage(prompt_tokens=2, completion_tokens=3)
    for message in [
        *(_stream_message(choices=[delta]) for delta in deltas),
        _stream_message(usage=usage),
    ]:
        rendered = to_json(convert.chunk_from_proto(message, logprobs=True))

        model = ChatCompletionChunk.model_validate_json(rendered)
        assert model.model_dump_json().encode() == rendered


def test_text_chunks_are_what_the_text_completion_model_serialises() -> None:
    logprobs = [inference_pb2.TokenLogprob(token="Hé", logprob=-0.25, bytes=b"H\xc3\xa9")]
    header = {"id": "cmpl-1", "model": "m", "created": Timestamp(seconds=5)}
    deltas = [
        pb.CompletionDelta(text='"Hé"\n', logprobs=logprobs),
        pb.CompletionDelta(index=1, text="x"),
        pb.CompletionDelta(finish_reason=inference_pb2.FINISH_REASON_LENGTH),
    ]
    usage = inference_pb2.Usage(prompt_tokens=2, completion_tokens=3)
    offsets: dict[int, int] = {}
    for message in [
        *(pb.StreamCompletionResponse(choices=[delta], **header) for delta in deltas),
        pb.StreamCompletionResponse(usage=usage, **header),
    ]:
        chunk = convert.text_chunk_from_proto(message, logprobs=True, offsets=offsets)
        rendered = to_json(chunk)

        model = TextCompletion.model_validate_json(rendered)
        assert model.model_dump_json().encode() == rendered
    assert offsets == {0: 5, 1: 1}


def test_content_chunk_is_not_usage_only() -> None:
    assert not convert.is_usage_only(_stream_message(choices=[pb.ChatCompletionDelta(content="x")]))


def test_model_list() -> None:
    response = pb.ListModelsResponse(
        models=[pb.Model(id="a", owned_by="resultity", created=Timestamp(seconds=9))]
    )

    assert convert.model_list_from_proto(response).model_dump(mode="json") == {
        "object": "list",
        "data": [{"id": "a", "object": "model", "created": 9, "owned_by": "resultity"}],
    }
