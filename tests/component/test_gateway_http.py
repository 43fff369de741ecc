"""The gateway over real HTTP and real gRPC, against a scripted cloud.

Most checks go through the official openai SDK with strict response validation,
so "the SDK parses it and raises the right exception" is what is tested; raw
httpx checks the bytes where the SDK would hide them (SSE framing, envelopes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
import structlog
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from core.errors import (
    DomainError,
    ErrorReason,
    InsufficientQuota,
    InvalidArgument,
    JobFailed,
    ModelNotFound,
    NoCapacity,
    RateLimited,
)
from gateway.app import create_app
from gateway.server import serve
from tests.doubles.scripted_cloud import (
    COMPLETION_ID,
    CREATED,
    TEST_API_KEY,
    TEXT_COMPLETION_ID,
    ScriptedCloud,
    start_cloud,
)
from tests.harness import serving_gateway

MODEL = "smollm2-135m"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


@dataclass
class Stack:
    cloud: ScriptedCloud
    base_url: str


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[Stack]:
    cloud = ScriptedCloud()
    grpc_server, target = await start_cloud(cloud)
    try:
        async with serving_gateway(target) as base_url:
            yield Stack(cloud, base_url)
    finally:
        await grpc_server.stop(grace=None)


@pytest.fixture(autouse=True)
def cloud(stack: Stack) -> ScriptedCloud:
    stack.cloud.reset()
    return stack.cloud


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.base_url}/v1",
        api_key=TEST_API_KEY,
        max_retries=0,
        _strict_response_validation=True,
    ) as sdk:
        yield sdk


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.base_url, headers={"authorization": f"Bearer {TEST_API_KEY}"}
    ) as raw:
        yield raw


def _events(body: bytes) -> list[bytes]:
    """The data of each SSE event, checking each is exactly one `data:` line."""
    assert body.endswith(b"\n\n")
    frames = body[:-2].split(b"\n\n")
    for frame in frames:
        assert frame.startswith(b"data: ")
        assert b"\n" not in frame
    return [frame[len(b"data: ") :] for frame in frames]


# --- chat completions through the SDK ------------------------------------------------------


async def test_chat_completion(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}],
            },
        ],
        max_tokens=10,
        max_completion_tokens=20,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=3,
        user="end-user-1",
        n=1,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logprobs=True,
        top_logprobs=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "greeting", "schema": {"type": "object"}, "strict": True},
        },
        logit_bias={"15339": -100, "7": 2.5},
    )
    completion = raw.parse()

    assert completion.id == COMPLETION_ID
    assert completion.object == "chat.completion"
    assert completion.created == CREATED
    assert completion.model == MODEL
    assert len(completion.choices) == 1
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage == CompletionUsage(prompt_tokens=7, completion_tokens=2, total_tokens=9)

    (call,) = cloud.calls
    assert call.method == "CreateChatCompletion"
    assert call.metadata["authorization"] == f"Bearer {TEST_API_KEY}"
    assert call.metadata["x-request-id"] == raw.headers["x-request-id"]
    assert len(raw.headers["x-request-id"]) == 32
    assert call.request == pb.CreateChatCompletionRequest(
        params=pb.ChatCompletionParams(
            model=MODEL,
            messages=[
                inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_SYSTEM, content="Be brief."),
                inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content="Say\nhi"),
            ],
            max_tokens=20,
            temperature=0.5,
            top_p=0.9,
            stop=["END"],
            seed=3,
            user="end-user-1",
            n=1,
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            logprobs=True,
            top_logprobs=2,
            response_format=inference_pb2.ResponseFormat(
                type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                json_schema='{"type": "object"}',
            ),
            logit_bias={15339: -100, 7: 2.5},
        )
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert [(item.token, item.bytes) for item in logprobs.content] == [
        ("Hello", list(b"Hello")),
        (" world", list(b" world")),
    ]
    assert [len(item.top_logprobs) for item in logprobs.content] == [2, 2]


async def test_logprobs_are_absent_unless_asked_for(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert completion.choices[0].logprobs is None

    body = {"model": MODEL, "messages": HELLO, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    assert all(
        choice["logprobs"] is None for e in events for choice in json.loads(e[6:])["choices"]
    )


async def test_stream_with_logprobs(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, logprobs=True, top_logprobs=1
    )
    tokens: list[str] = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                assert choice.logprobs is not None
                assert choice.logprobs.content is not None
                tokens.extend(item.token for item in choice.logprobs.content)
            else:
                assert choice.logprobs is None
    assert tokens == ["Hello", " world"]


async def test_several_choices(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, n=2)

    assert [choice.index for choice in completion.choices] == [0, 1]
    assert {choice.message.content for choice in completion.choices} == {"Hello world"}
    (call,) = cloud.calls
    assert call.request.params.n == 2


async def test_length_finish_reason(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    cloud.script.finish_reason = inference_pb2.FINISH_REASON_LENGTH

    completion = await client.chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.choices[0].finish_reason == "length"


def _delta_rows(chunks: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (c.choices[0].delta.role, c.choices[0].delta.content, c.choices[0].finish_reason)
        for c in chunks
    ]


_STREAMED_ROWS = [
    ("assistant", "", None),
    (None, "Hello", None),
    (None, " world", None),
    (None, None, "stop"),
]


async def test_stream_without_usage(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]

    assert _delta_rows(chunks) == _STREAMED_ROWS
    assert all(chunk.usage is None for chunk in chunks)
    assert {(c.id, c.model, c.created, c.object) for c in chunks} == {
        (COMPLETION_ID, MODEL, CREATED, "chat.completion.chunk")
    }
    assert cloud.calls[0].method == "StreamChatCompletion"


async def test_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert _delta_rows(chunks[:-1]) == _STREAMED_ROWS
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage == CompletionUsage(prompt_tokens=7, completion_tokens=2, total_tokens=9)


async def test_list_models(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    page = await client.models.list()

    assert [(m.id, m.object, m.created, m.owned_by) for m in page.data] == [
        (model, "model", CREATED, "resultity") for model in cloud.models
    ]
    assert cloud.calls[0].metadata["authorization"] == f"Bearer {TEST_API_KEY}"


# --- error mapping through the SDK ---------------------------------------------------------

_ERROR_CASES = [
    pytest.param(
        ModelNotFound("nope"),
        openai.NotFoundError,
        404,
        ("invalid_request_error", "model", "model_not_found"),
        id="model_not_found",
    ),
    pytest.param(
        InvalidArgument("prompt too long", field="messages"),
        openai.BadRequestError,
        400,
        ("invalid_request_error", "messages", None),
        id="invalid_argument",
    ),
    pytest.param(
        InsufficientQuota("top up"),
        openai.RateLimitError,
        429,
        ("insufficient_quota", None, "insufficient_quota"),
        id="insufficient_quota",
    ),
    pytest.param(
        NoCapacity("all busy"),
        openai.InternalServerError,
        503,
        ("service_unavailable", None, "no_capacity"),
        id="no_capacity",
    ),
    pytest.param(
        JobFailed("node lost"),
        openai.InternalServerError,
        502,
        ("server_error", None, None),
        id="job_failed",
    ),
    pytest.param(
        DomainError("unexpected", reason=ErrorReason.IDEMPOTENCY_KEY_REUSED),
        openai.InternalServerError,
        500,
        ("server_error", None, None),
        id="unlisted_reason",
    ),
]


def _assert_status_error(
    caught: pytest.ExceptionInfo[openai.APIStatusError],
    status: int,
    fields: tuple[str | None, str | None, str | None],
) -> None:
    error = caught.value
    assert error.status_code == status
    assert (error.type, error.param, error.code) == fields
    assert len(error.response.headers["x-request-id"]) == 32


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("domain_error", "exception", "status", "fields"), _ERROR_CASES)
async def test_cloud_errors(
    client: openai.AsyncOpenAI,
    cloud: ScriptedCloud,
    stream: bool,
    domain_error: DomainError,
    exception: type[openai.APIStatusError],
    status: int,
    fields: tuple[str | None, str | None, str | None],
) -> None:
    cloud.script.error = domain_error

    with pytest.raises(exception) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, stream=stream)

    _assert_status_error(caught, status, fields)
    if status < 500:
        assert caught.value.message.endswith(domain_error.message)


async def test_insufficient_quota_says_do_not_retry(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.error = InsufficientQuota("top up")

    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO)

    assert caught.value.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("stream", [False, True])
async def test_wrong_key(stack: Stack, cloud: ScriptedCloud, stream: bool) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.base_url}/v1",
        api_key="sk-wrong",
        max_retries=0,
        _strict_response_validation=True,
    ) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=stream)
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()

    _assert_status_error(caught, 401, ("invalid_request_error", None, "invalid_api_key"))
    assert cloud.calls[0].metadata["authorization"] == "Bearer sk-wrong"


@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ],
)
async def test_status_without_error_info(
    client: openai.AsyncOpenAI,
    cloud: ScriptedCloud,
    code: grpc.StatusCode,
    status: int,
    error_type: str,
) -> None:
    cloud.script.abort = (code, "secret internals")

    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO)

    _assert_status_error(caught, status, (error_type, None, None))
    assert "secret" not in caught.value.message


async def test_error_after_stream_started_raises_in_sdk(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.error_mid_stream = JobFailed("node lost")
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    received: list[Any] = []

    async def drain() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError, match="node lost"):
        await drain()

    assert _delta_rows(received) == _STREAMED_ROWS[:3]


# --- raw HTTP ------------------------------------------------------------------------------


async def test_sse_framing(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "stream": True}
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert len(response.headers["x-request-id"]) == 32
    assert response.content.endswith(b"\n\ndata: [DONE]\n\n")
    *chunks, done = _events(response.content)
    assert done == b"[DONE]"
    payloads = [json.loads(chunk) for chunk in chunks]
    assert [p["choices"][0]["delta"] for p in payloads] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {"content": " world"},
        {},
    ]
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, None, "stop"]
    assert all("usage" not in p for p in payloads)


async def test_sse_usage_keys(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    *chunks, done = _events(response.content)
    payloads = [json.loads(chunk) for chunk in chunks]
    assert done == b"[DONE]"
    assert [p["usage"] for p in payloads[:-1]] == [None] * 4
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


async def test_in_band_error_after_stream_started(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    cloud.script.error_mid_stream = JobFailed("node lost")

    response = await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "stream": True}
    )

    assert response.status_code == 200
    events = _events(response.content)
    assert len(events) == 5  # role, two deltas, the error, [DONE]
    assert json.loads(events[-2]) == {
        "error": {"message": "node lost", "type": "server_error", "param": None, "code": None}
    }
    assert events[-1] == b"[DONE]"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
            "messages.0.tool_call_id",
        ),
        ({"model": MODEL, "messages": HELLO, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": HELLO, "n": 0}, "n"),
        ({"model": MODEL, "messages": HELLO, "n": 0, "stream": True}, "n"),
        ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        ({"model": MODEL, "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": HELLO, "logprobs": "true"}, "logprobs"),
        ({"model": MODEL, "messages": HELLO, "logit_bias": {"15339": -101}}, "logit_bias.15339"),
        ({"model": MODEL, "messages": HELLO, "logit_bias": {"-1": 5}}, "logit_bias.-1.[key]"),
        ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function"}]}, "tools.0.function"),
        ({"model": MODEL, "messages": HELLO, "n": 9}, "n"),
        ({"model": MODEL, "messages": HELLO, "stop": [""]}, "stop.0"),
        ({"model": MODEL, "messages": HELLO, "stop": ["x" * 257]}, "stop.0"),
        ({"model": "m" * 1_000_000, "messages": HELLO}, "model"),
        ({"model": MODEL, "messages": HELLO, "user": "u" * 257}, "user"),
    ],
)
async def test_bad_input_envelope(
    http: httpx.AsyncClient, cloud: ScriptedCloud, body: dict[str, Any], param: str
) -> None:
    response = await http.post("/v1/chat/completions", json=body)

    assert response.status_code == 400
    assert len(response.headers["x-request-id"]) == 32
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    assert len(error["message"]) < 200
    assert cloud.calls == []


async def test_a_huge_model_with_a_bad_key_is_not_logged(stack: Stack) -> None:
    captured = structlog.testing.LogCapture()
    previous = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, captured])
    try:
        async with httpx.AsyncClient(
            base_url=stack.base_url, headers={"authorization": "Bearer rsk_wrong"}
        ) as raw:
            response = await raw.post(
                "/v1/chat/completions", json={"model": "m" * 3_000_000, "messages": HELLO}
            )
            await raw.get("/v1/models/" + "m" * 20_000)
    finally:
        structlog.configure(**previous)

    assert response.status_code == 400
    logged = sum(len(str(value)) for entry in captured.entries for value in entry.values())
    assert captured.entries
    assert logged < 2_000


@pytest.mark.parametrize(
    ("path", "prompt"), [("/v1/chat/completions", None), ("/v1/completions", "x")]
)
async def test_null_stop_means_none(
    http: httpx.AsyncClient, cloud: ScriptedCloud, path: str, prompt: str | None
) -> None:
    """What the openai SDK sends for stop=None."""
    body: dict[str, Any] = {"model": MODEL, "stop": None}
    body.update({"messages": HELLO} if prompt is None else {"prompt": prompt})
    response = await http.post(path, json=body)

    assert response.status_code == 200
    assert list(cloud.calls[0].request.params.stop) == []


async def test_oversized_key_is_refused_without_calling_cloud(
    stack: Stack, cloud: ScriptedCloud
) -> None:
    headers = {"authorization": "Bearer " + "k" * 100_000}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers) as raw:
        response = await raw.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert cloud.calls == []


async def test_oversized_region_header_is_refused(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO},
        headers={"x-resultity-region": "r" * 100_000},
    )

    assert response.status_code == 400
    assert cloud.calls == []


async def test_oversized_model_in_a_path_gets_a_short_404(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    response = await http.get("/v1/models/" + "m" * 20_000)

    assert response.status_code == 404
    assert len(response.json()["error"]["message"]) < 200


@pytest.mark.parametrize(
    ("path", "body", "cloud_field", "param"),
    [
        # The caller named the limit max_completion_tokens; cloud calls it max_tokens.
        (
            "/v1/chat/completions",
            {"max_completion_tokens": 9},
            "max_tokens",
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", {"max_tokens": 9}, "max_tokens", "max_tokens"),
        # A header, not a field of the request.
        ("/v1/chat/completions", {}, "region", None),
        # A node reports a prompt too long for its context as the messages'.
        ("/v1/completions", {}, "messages", "prompt"),
        ("/v1/embeddings", {}, "messages", "input"),
        ("/v1/chat/completions", {}, "messages", "messages"),
    ],
)
async def test_cloud_fields_become_the_requests_params(
    http: httpx.AsyncClient,
    cloud: ScriptedCloud,
    path: str,
    body: dict[str, Any],
    cloud_field: str,
    param: str | None,
) -> None:
    cloud.script.error = InvalidArgument("refused", field=cloud_field)
    base: dict[str, Any] = {
        "/v1/chat/completions": {"model": MODEL, "messages": HELLO},
        "/v1/completions": {"model": MODEL, "prompt": "x"},
        "/v1/embeddings": {"model": MODEL, "input": "x"},
    }[path]
    response = await http.post(path, json={**base, **body})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"[1]", b""])
async def test_body_not_a_json_object(
    http: httpx.AsyncClient, cloud: ScriptedCloud, content: bytes
) -> None:
    response = await http.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] is None
    assert cloud.calls == []


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Basic dXNlcjpwYXNz"])
@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/chat/completions"), ("GET", "/v1/models")]
)
async def test_missing_key_is_rejected_without_calling_cloud(
    stack: Stack, cloud: ScriptedCloud, authorization: str | None, method: str, path: str
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers) as raw:
        response = await raw.request(method, path, json={"model": MODEL, "messages": HELLO})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert cloud.calls == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("POST", "/v1/images/generations", 404),
        ("GET", "/v1/chat/completions", 405),
    ],
)
async def test_unknown_route_envelope(
    http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    response = await http.request(method, path)

    assert response.status_code == status
    assert len(response.headers["x-request-id"]) == 32
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


async def test_request_ids_differ(http: httpx.AsyncClient, cloud: ScriptedCloud) -> None:
    first = await http.get("/v1/models")
    second = await http.get("/v1/models")

    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert ids[0] != ids[1]
    assert [call.metadata["x-request-id"] for call in cloud.calls] == ids


# --- client disconnects cancel the cloud call ----------------------------------------------

# A safety net so a regression fails instead of hanging; not a performance threshold.
_CANCEL_WAIT_S = 10


async def test_stream_disconnect_cancels_cloud_call(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    cloud.script.hang = True
    body = {"model": MODEL, "messages": HELLO, "stream": True}

    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        await cloud.hanging.wait()
    # Leaving the block unread closes the connection.

    await asyncio.wait_for(cloud.cancelled.wait(), _CANCEL_WAIT_S)


async def test_unary_disconnect_cancels_cloud_call(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    cloud.script.hang = True
    request = asyncio.create_task(
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    )

    await cloud.hanging.wait()
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request

    await asyncio.wait_for(cloud.cancelled.wait(), _CANCEL_WAIT_S)


# --- server lifecycle ----------------------------------------------------------------------


async def test_serve_reports_a_port_in_use(stack: Stack) -> None:
    port = int(stack.base_url.rsplit(":", 1)[1])

    with pytest.raises(RuntimeError, match="failed to start"):
        await serve(create_app("127.0.0.1:1"), "127.0.0.1", port)


# --- text completions, single models, limits, overhead, OpenAPI ---------------------------


async def test_text_completion(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    completion = await client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, stop=["\n"], seed=1, n=1, logprobs=2
    )

    assert completion.object == "text_completion"
    assert completion.id == TEXT_COMPLETION_ID
    [choice] = completion.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, "Hello world", "stop")
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["Hello", " world"]
    assert choice.logprobs.text_offset == [0, 5]
    assert choice.logprobs.top_logprobs is not None
    assert [len(top) for top in choice.logprobs.top_logprobs] == [1, 1]  # same token twice
    assert completion.usage == CompletionUsage(prompt_tokens=7, completion_tokens=2, total_tokens=9)
    (call,) = cloud.calls
    assert call.request == pb.CreateCompletionRequest(
        params=pb.CompletionParams(
            model=MODEL,
            prompts=["Once upon"],
            max_tokens=5,
            stop=["\n"],
            seed=1,
            n=1,
            logprobs=True,
            top_logprobs=2,
        )
    )


async def test_text_completion_defaults_to_16_tokens_and_takes_a_prompt_list(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    completion = await client.completions.create(model=MODEL, prompt=["a", "b"], n=2)

    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]
    assert all(choice.logprobs is None for choice in completion.choices)
    (call,) = cloud.calls
    assert list(call.request.params.prompts) == ["a", "b"]
    assert call.request.params.max_tokens == 16


async def test_streamed_text_completion(stack: Stack) -> None:
    # The SDK parses completion chunks as whole Completions, whose finish_reason may not
    # be null, yet OpenAI sends null until a choice ends; so no strict validation here.
    async with openai.AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key=TEST_API_KEY, max_retries=0
    ) as lenient:
        stream = await lenient.completions.create(
            model=MODEL, prompt="Once upon", stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

    texts = [choice.text for chunk in chunks for choice in chunk.choices]
    assert "".join(texts) == "Hello world"
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices]
    assert reasons.count("stop") == 1
    assert reasons[-1] == "stop"
    assert not chunks[-1].choices
    assert chunks[-1].usage == CompletionUsage(prompt_tokens=7, completion_tokens=2, total_tokens=9)


async def test_streamed_text_completion_framing(http: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "Once upon", "stream": True}
    response = await http.post("/v1/completions", json=body)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    # Without include_usage no chunk has a usage key, and none is empty.
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " world", ""]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "prompt": [1, 2]}, "prompt.0"),
        ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
        ({"model": MODEL, "prompt": "x", "suffix": "end"}, "suffix"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
async def test_bad_text_completion_input(
    http: httpx.AsyncClient, cloud: ScriptedCloud, body: dict[str, Any], param: str
) -> None:
    response = await http.post("/v1/completions", json=body)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert not cloud.calls


async def test_get_model(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    model = await client.models.retrieve(MODEL)

    assert (model.id, model.object, model.owned_by, model.created) == (
        MODEL,
        "model",
        "resultity",
        CREATED,
    )
    assert cloud.calls[0].request == pb.GetModelRequest(model=MODEL)


async def test_get_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found"


async def test_body_over_the_limit_is_413(stack: Stack, cloud: ScriptedCloud) -> None:
    app = create_app("127.0.0.1:1", max_body_bytes=100)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as small:
        headers = {"authorization": f"Bearer {TEST_API_KEY}"}
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200}]}
        declared = await small.post("/v1/chat/completions", json=big, headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps(big).encode()

        # No content-length: the limit holds while the body streams in.
        streamed = await small.post("/v1/completions", content=chunks(), headers=headers)

    for response in (declared, streamed):
        assert response.status_code == 413
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert "x-request-id" in response.headers


async def test_overhead_header_excludes_the_nodes_time(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    body = {"model": MODEL, "messages": HELLO}
    cloud.script.generation_ms = 10_000_000.0  # far more than the request took
    unary = await http.post("/v1/chat/completions", json=body)
    assert float(unary.headers["x-resultity-overhead-ms"]) == 0.0

    cloud.script.generation_ms = 0.0
    for response in (
        await http.post("/v1/chat/completions", json=body),
        await http.post("/v1/chat/completions", json={**body, "stream": True}),
        await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}),
        await http.get("/v1/models"),
        await http.post("/v1/chat/completions", json={"model": MODEL}),
    ):
        assert float(response.headers["x-resultity-overhead-ms"]) >= 0.0
        assert len(response.headers["x-request-id"]) == 32


async def test_openapi_document_describes_the_bodies(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")

    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/responses",
    }
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    components = document["components"]["schemas"]
    assert "messages" in components["ChatCompletionRequest"]["properties"]
    assert "prompt" in components["CompletionRequest"]["properties"]
    assert "input" in components["ResponseRequest"]["properties"]
    # Every reference resolves inside the document.
    references = set(re.findall(r'"#/components/schemas/([^"]+)"', response.text))
    assert references <= set(components)


# --- rate limits ---------------------------------------------------------------------------

_LIMITS = (
    ("x-ratelimit-limit-requests", "60"),
    ("x-ratelimit-remaining-requests", "59"),
    ("x-ratelimit-limit-tokens", "1000"),
    ("x-ratelimit-remaining-tokens", "900"),
)


@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limit_state_is_copied_to_the_response(
    http: httpx.AsyncClient, cloud: ScriptedCloud, stream: bool
) -> None:
    cloud.script.rate_limits = _LIMITS
    response = await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "stream": stream}
    )

    assert response.status_code == 200
    assert {key: response.headers[key] for key, _ in _LIMITS} == dict(_LIMITS)


async def test_rate_limited_is_429_with_retry_after(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.error = RateLimited("Rate limit reached.", retry_after_s=7, headers=_LIMITS)

    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model=MODEL, messages=HELLO)

    error = raised.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == "7"
    assert "x-should-retry" not in error.response.headers
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "900"


# --- embeddings ----------------------------------------------------------------------------


async def test_embeddings_in_base64_as_the_sdk_asks(stack: Stack, cloud: ScriptedCloud) -> None:
    # Unasked, the SDK requests base64 and decodes it after parsing; its strict
    # validation checks the undecoded body against a list of floats, so it is off here.
    async with openai.AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key=TEST_API_KEY, max_retries=0
    ) as lenient:
        response = await lenient.embeddings.create(model=MODEL, input=["a", "b"])

    assert [item.embedding for item in response.data] == [[0.0, 0.5, -0.25], [1.0, 0.5, -0.25]]
    assert [item.index for item in response.data] == [0, 1]
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (7, 7)
    (call,) = cloud.calls
    assert call.request == pb.CreateEmbeddingsRequest(model=MODEL, inputs=["a", "b"])


async def test_embeddings_as_floats(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/embeddings", json={"model": MODEL, "input": "a", "encoding_format": "float"}
    )

    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, -0.25]}],
        "model": MODEL,
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [[1, 2]]}, "input.0"),
        ({"model": MODEL, "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": MODEL, "input": "a", "dimensions": 8}, "dimensions"),
    ],
)
async def test_bad_embedding_input(
    http: httpx.AsyncClient, cloud: ScriptedCloud, body: dict[str, Any], param: str
) -> None:
    response = await http.post("/v1/embeddings", json=body)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert not cloud.calls
