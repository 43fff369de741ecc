"""The bytes of streamed completions and responses, whole bodies against fixed
expected output (tests/unit/stream_bytes/): what the wire carries must not change
when their rendering does.

The gateway app runs in-process in front of a cloud stub whose streams are lists
of messages, as cloud sends them to a gateway that asks for the events ready
together (batch_events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2
from starlette.types import Message

from core.errors import DomainError, JobFailed, RateLimited
from core.grpc_errors import to_status
from gateway.app import create_app
from tests.doubles.one_replica import one_replica

EXPECTED = Path(__file__).parent / "stream_bytes"
_Message = pb.StreamCompletionResponse | pb.StreamChatCompletionResponse


class _Stream:
    """A streamed cloud call that yields its messages, then fails with ``error`` if set."""

    def __init__(self, messages: Sequence[_Message], error: DomainError | None) -> None:
        self._messages = messages
        self._error = error

    async def _each(self) -> AsyncIterator[_Message]:
        for message in self._messages:
            await asyncio.sleep(0)
            yield message
        if self._error is not None:
            status = to_status(self._error)
            raise grpc.aio.AioRpcError(
                status.code,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(*status.trailing_metadata),
                details=status.details,
            )

    def __aiter__(self) -> AsyncIterator[_Message]:
        return self._each()

    async def initial_metadata(self) -> tuple[()]:
        return ()

    def cancel(self) -> bool:
        return False


class _Cloud:
    def __init__(self, messages: Sequence[_Message], error: DomainError | None) -> None:
        self.stream = _Stream(messages, error)

    def StreamCompletion(self, request: pb.StreamCompletionRequest, metadata: Any) -> _Stream:
        assert request.batch_events
        return self.stream

    def StreamChatCompletion(
        self, request: pb.StreamChatCompletionRequest, metadata: Any
    ) -> _Stream:
        assert request.batch_events
        return self.stream


_CREATED = Timestamp(seconds=1_700_000_000)
_USAGE = inference_pb2.Usage(prompt_tokens=7, completion_tokens=5)
_BILLING = pb.Billing(charged_micro_credits=42)
_STOP = inference_pb2.FINISH_REASON_STOP
_LENGTH = inference_pb2.FINISH_REASON_LENGTH
_TOOL_CALLS = inference_pb2.FINISH_REASON_TOOL_CALLS


def _text(*choices: pb.CompletionDelta, usage: bool = False) -> pb.StreamCompletionResponse:
    return pb.StreamCompletionResponse(
        id="cmpl-0123abcd",
        model="smollm2-135m",
        created=_CREATED,
        choices=choices,
        usage=_USAGE if usage else None,
        billing=_BILLING if usage else None,
    )


def _chat(*choices: pb.ChatCompletionDelta, usage: bool = False) -> pb.StreamChatCompletionResponse:
    return pb.StreamChatCompletionResponse(
        id="chatcmpl-0123abcd",
        model="smollm2-135m",
        created=_CREATED,
        choices=choices,
        usage=_USAGE if usage else None,
        billing=_BILLING if usage else None,
    )


def _logprobs(*tokens: str) -> list[inference_pb2.TokenLogprob]:
    return [
        inference_pb2.TokenLogprob(
            token=token,
            logprob=-0.5 - index,
            bytes=token.encode(),
            top_logprobs=[inference_pb2.TopLogprob(token=token, logprob=-0.5 - index)],
        )
        for index, token in enumerate(tokens)
    ]


_ROLE = pb.ChatCompletionDelta(role=inference_pb2.CHAT_ROLE_ASSISTANT)

_TEXT_PROMPT = {"model": "smollm2-135m", "prompt": "Once", "stream": True}
_RESPONSE_INPUT = {"model": "smollm2-135m", "input": "Say hi.", "stream": True}
_TOOLS = [
    {
        "type": "function",
        "name": "weather",
        "description": "Today's weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]

# name: (route, request body, cloud's messages, error after them)
CASES: dict[str, tuple[str, dict[str, object], list[_Message], DomainError | None]] = {
    "completion_plain": (
        "/v1/completions",
        _TEXT_PROMPT,
        [
            _text(),
            _text(
                pb.CompletionDelta(text=" upon"),
                pb.CompletionDelta(text=' a "time"\n'),
                pb.CompletionDelta(finish_reason=_STOP),
            ),
            _text(usage=True),
        ],
        None,
    ),
    "completion_usage_logprobs_two_prompts": (
        "/v1/completions",
        {
            **_TEXT_PROMPT,
            "prompt": ["Once", "Twice"],
            "logprobs": 1,
            "stream_options": {"include_usage": True},
        },
        [
            _text(),
            _text(pb.CompletionDelta(text="Hé", logprobs=_logprobs("H", "é"))),
            _text(
                pb.CompletionDelta(index=1, text=" no", logprobs=_logprobs(" no")),
                pb.CompletionDelta(text="!", logprobs=_logprobs("!")),
                pb.CompletionDelta(finish_reason=_LENGTH),
                pb.CompletionDelta(index=1, finish_reason=_STOP),
            ),
            _text(usage=True),
        ],
        None,
    ),
    "completion_error_mid_stream": (
        "/v1/completions",
        _TEXT_PROMPT,
        [_text(), _text(pb.CompletionDelta(text=" upon"))],
        JobFailed("the node stopped answering"),
    ),
    # Chat completions share the chunks' rendering.
    "chat_usage_logprobs_tool_call": (
        "/v1/chat/completions",
        {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Say hi."}],
            "stream": True,
            "logprobs": True,
            "stream_options": {"include_usage": True},
        },
        [
            _chat(_ROLE),
            _chat(
                pb.ChatCompletionDelta(content="Hé", logprobs=_logprobs("H", "é")),
                pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(id="call_1", name="f")]),
                pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(arguments="{}")]),
                pb.ChatCompletionDelta(finish_reason=_TOOL_CALLS),
            ),
            _chat(usage=True),
        ],
        None,
    ),
    "response_text": (
        "/v1/responses",
        {**_RESPONSE_INPUT, "instructions": "Be brief.", "metadata": {"k": "v"}},
        [
            _chat(_ROLE),
            _chat(
                pb.ChatCompletionDelta(content="Hi"),
                pb.ChatCompletionDelta(content=' "there"\n'),
                pb.ChatCompletionDelta(finish_reason=_STOP),
            ),
            _chat(usage=True),
        ],
        None,
    ),
    "response_incomplete_json": (
        "/v1/responses",
        {
            **_RESPONSE_INPUT,
            "max_output_tokens": 3,
            "temperature": 0.5,
            "text": {"format": {"type": "json_schema", "name": "r", "schema": {"type": "object"}}},
        },
        [
            _chat(_ROLE),
            _chat(pb.ChatCompletionDelta(content='{"a"')),
            _chat(
                pb.ChatCompletionDelta(content=": 1"), pb.ChatCompletionDelta(finish_reason=_LENGTH)
            ),
            _chat(usage=True),
        ],
        None,
    ),
    "response_tool_calls": (
        "/v1/responses",
        {**_RESPONSE_INPUT, "tools": _TOOLS, "tool_choice": "auto"},
        [
            _chat(_ROLE),
            _chat(
                pb.ChatCompletionDelta(content="Checking."),
                pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(id="call_1", name="weather")]),
                pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(arguments='{"city": ')]),
                pb.ChatCompletionDelta(tool_calls=[pb.ToolCallDelta(arguments='"Oslo"}')]),
                pb.ChatCompletionDelta(
                    tool_calls=[
                        pb.ToolCallDelta(index=1, id="call_2", name="weather", arguments="{}")
                    ]
                ),
            ),
            _chat(pb.ChatCompletionDelta(finish_reason=_TOOL_CALLS)),
            _chat(usage=True),
        ],
        None,
    ),
    "response_error_mid_stream": (
        "/v1/responses",
        _RESPONSE_INPUT,
        [_chat(_ROLE), _chat(pb.ChatCompletionDelta(content="Hi"))],
        RateLimited("too many tokens", retry_after_s=3),
    ),
}


async def _body(route: str, body: dict[str, object], cloud: _Cloud) -> bytes:
    app = create_app("127.0.0.1:1")
    app.state.cloud = one_replica(cloud)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post(
            route, content=json.dumps(body), headers={"authorization": "Bearer sk-test"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return response.content


@pytest.mark.parametrize("name", sorted(CASES))
async def test_stream_bytes_are_the_expected_ones(name: str) -> None:
    route, body, messages, error = CASES[name]

    rendered = await _body(route, body, _Cloud(messages, error))

    assert rendered == (EXPECTED / f"{name}.txt").read_bytes()


async def _writes(route: str, body: dict[str, object], cloud: _Cloud) -> list[bytes]:
    """The body's parts, one per ASGI message (each a socket write)."""
    app = create_app("127.0.0.1:1")
    app.state.cloud = one_replica(cloud)
    request = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer sk-test"), (b"host", b"gateway")],
        "client": ("127.0.0.1", 1),
        "server": ("gateway", 80),
    }
    received = False
    parts: list[bytes] = []

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": request, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            parts.append(message["body"])

    await app(scope, receive, send)
    return parts


@pytest.mark.parametrize("name", ["completion_plain", "response_text"])
async def test_a_stream_of_three_messages_goes_out_in_two_writes(name: str) -> None:
    # Cloud's opening message (the role; for a text completion, a message of no delta)
    # shows nothing alone: its events go out with the text and finish, then usage ends
    # the body.
    route, body, messages, error = CASES[name]

    parts = await _writes(route, body, _Cloud(messages, error))

    assert len(parts) == 2
    assert b"".join(parts) == (EXPECTED / f"{name}.txt").read_bytes()
