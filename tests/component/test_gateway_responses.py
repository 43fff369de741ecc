"""The Responses API (`POST /v1/responses`) over real HTTP and real gRPC, against a
scripted cloud: what the gateway asks cloud for, and what the official SDK (strict
validation) and raw bytes get back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from resultity.common.v1 import inference_pb2

from core.errors import InvalidArgument, JobFailed, ModelNotFound
from tests.doubles.scripted_cloud import (
    CREATED,
    TEST_API_KEY,
    ScriptedCloud,
    start_cloud,
)
from tests.harness import serving_gateway

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[tuple[ScriptedCloud, str]]:
    cloud = ScriptedCloud()
    server, target = await start_cloud(cloud)
    try:
        async with serving_gateway(target) as base_url:
            yield cloud, base_url
    finally:
        await server.stop(grace=None)


@pytest.fixture
def cloud(stack: tuple[ScriptedCloud, str]) -> ScriptedCloud:
    stack[0].reset()
    return stack[0]


@pytest.fixture
async def client(stack: tuple[ScriptedCloud, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{stack[1]}/v1",
        api_key=TEST_API_KEY,
        max_retries=0,
        _strict_response_validation=True,
    ) as sdk:
        yield sdk


@pytest.fixture
async def http(stack: tuple[ScriptedCloud, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack[1], headers={"authorization": f"Bearer {TEST_API_KEY}"}
    ) as raw:
        yield raw


def _sse(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event, checking the framing: `event:` then one
    `data:` line, and the name repeats the data's type."""
    assert body.endswith(b"\n\n")
    events = []
    for frame in body[:-2].decode().split("\n\n"):
        name_line, data_line = frame.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


async def test_a_string_input_is_one_user_message(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    response = await client.responses.create(model=MODEL, input="Say hello")

    assert response.status == "completed"
    assert response.output_text == "Hello world"
    assert response.id == "resp_scripted"
    assert response.created_at == CREATED
    [message] = response.output
    assert message.type == "message"
    assert (message.id, message.status, message.role) == ("msg_scripted", "completed", "assistant")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 2)
    assert response.usage.total_tokens == 9
    assert (response.tools, response.tool_choice) == ([], "auto")
    # Nothing is stored, whatever store asked.
    assert response.to_dict()["store"] is False
    [call] = cloud.calls
    assert call.method == "CreateChatCompletion"
    params = call.request.params
    assert [(m.role, m.content) for m in params.messages] == [
        (inference_pb2.CHAT_ROLE_USER, "Say hello")
    ]
    assert not params.HasField("max_tokens")
    assert not params.tools
    assert not params.HasField("tool_choice")


async def test_items_instructions_and_sampling_reach_cloud(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    response = await client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {
                "type": "message",
                "id": "msg_earlier",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hello", "annotations": []}],
            },
            {"type": "message", "role": "user", "content": "count to 3"},
        ],
        max_output_tokens=32,
        temperature=0.5,
        top_p=0.9,
        store=True,
        metadata={"ticket": "42"},
        safety_identifier="user-7",
        parallel_tool_calls=False,
        tool_choice="none",
        truncation="disabled",
    )

    params = cloud.calls[0].request.params
    system, user, assistant = (
        inference_pb2.CHAT_ROLE_SYSTEM,
        inference_pb2.CHAT_ROLE_USER,
        inference_pb2.CHAT_ROLE_ASSISTANT,
    )
    assert [(m.role, m.content) for m in params.messages] == [
        (system, "Be brief."),
        (inference_pb2.CHAT_ROLE_DEVELOPER, "Answer in English."),
        (user, "hi"),
        (assistant, "hello"),
        (user, "count to 3"),
    ]
    assert (params.max_tokens, params.temperature, params.top_p) == (32, 0.5, 0.9)
    # Without tools, a choice of none and parallel calls change nothing: not sent.
    assert not params.HasField("tool_choice")
    assert not params.HasField("parallel_tool_calls")
    assert params.user == "user-7"
    # The response repeats the request's settings; nothing was stored.
    assert (response.instructions, response.max_output_tokens) == ("Be brief.", 32)
    assert (response.temperature, response.top_p) == (0.5, 0.9)
    assert response.metadata == {"ticket": "42"}
    assert (response.parallel_tool_calls, response.tool_choice) == (False, "none")
    assert response.to_dict()["store"] is False


@pytest.mark.parametrize(
    ("text_format", "kind", "schema"),
    [
        ({"type": "json_object"}, inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT, ""),
        (
            {"type": "json_schema", "name": "point", "schema": {"type": "object"}, "strict": True},
            inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            '{"type": "object"}',
        ),
        ({"type": "text"}, inference_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED, ""),
    ],
)
async def test_text_format_becomes_the_response_format(
    client: openai.AsyncOpenAI,
    cloud: ScriptedCloud,
    text_format: Any,
    kind: int,
    schema: str,
) -> None:
    response = await client.responses.create(
        model=MODEL, input="a point", text={"format": text_format}
    )

    sent = cloud.calls[0].request.params.response_format
    assert (sent.type, sent.json_schema) == (kind, schema)
    assert response.text is not None
    assert response.text.format is not None
    assert response.text.format.type == text_format["type"]


async def test_max_output_tokens_reached_is_incomplete(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.finish_reason = inference_pb2.FINISH_REASON_LENGTH

    response = await client.responses.create(model=MODEL, input="hi", max_output_tokens=2)

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]


EXPECTED_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


async def test_stream_through_the_sdk(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    stream = await client.responses.create(model=MODEL, input="Say hello", stream=True)
    events = [event async for event in stream]

    assert [event.type for event in events] == EXPECTED_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))
    created, completed = events[0], events[-1]
    assert created.type == "response.created"
    assert (created.response.status, created.response.output) == ("in_progress", [])
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["Hello", " world"]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "Hello world"
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == 2
    assert completed.response.id == created.response.id == "resp_scripted"
    assert cloud.calls[0].method == "StreamChatCompletion"


async def test_the_sdks_stream_helper_assembles_the_response(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model=MODEL, input="Say hello") as stream:
        texts = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()

    assert texts == ["Hello", " world"]
    assert final.output_text == "Hello world"
    assert final.status == "completed"


async def test_stream_bytes(http: httpx.AsyncClient, cloud: ScriptedCloud) -> None:
    cloud.script.finish_reason = inference_pb2.FINISH_REASON_LENGTH
    response = await http.post(
        "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _sse(response.content)
    assert [name for name, _ in events] == [*EXPECTED_EVENTS[:-1], "response.incomplete"]
    item_done = events[-2][1]
    assert item_done["item"]["status"] == "incomplete"
    assert item_done["item"]["content"] == [
        {"type": "output_text", "text": "Hello world", "annotations": [], "logprobs": []}
    ]
    final = events[-1][1]["response"]
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert b"[DONE]" not in response.content


async def test_a_failure_mid_stream_is_an_error_event_then_response_failed(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    cloud.script.error_mid_stream = JobFailed("the node failed")
    response = await http.post(
        "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}
    )

    events = _sse(response.content)
    assert [name for name, _ in events][-2:] == ["error", "response.failed"]
    error, failed = events[-2][1], events[-1][1]
    assert error["message"] == "the node failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "the node failed"}
    # What was delivered before the failure stays in the output.
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hello world"


async def test_errors_before_the_stream_are_http_errors(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.error = ModelNotFound("nope")
    with pytest.raises(openai.NotFoundError) as raised:
        await client.responses.create(model="nope", input="hi", stream=True)
    assert raised.value.param == "model"


async def test_cloud_fields_are_named_as_the_request_does(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.error = InvalidArgument(
        "schema too deep", field="response_format.json_schema.schema"
    )
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(
            model=MODEL,
            input="hi",
            text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        )
    assert raised.value.param == "text.format.schema"

    cloud.script.error = InvalidArgument("too long", field="max_tokens")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(model=MODEL, input="hi", max_output_tokens=10**6)
    assert raised.value.param == "max_output_tokens"


async def test_rate_limit_state_is_copied_to_the_response(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    cloud.script.rate_limits = (("x-ratelimit-remaining-requests", "59"),)
    for stream in (False, True):
        response = await http.post(
            "/v1/responses", json={"model": MODEL, "input": "hi", "stream": stream}
        )
        assert response.headers["x-ratelimit-remaining-requests"] == "59"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "not stored"),
        ({"conversation": "conv_1"}, "conversation", "not stored"),
        ({"tools": [{"type": "web_search"}]}, "tools", "only functions"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools.0.name", "pattern"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice", "must be"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "do not reason"),
        ({"background": True}, "background", "not stored"),
        ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
        ({"truncation": "auto"}, "truncation", "disabled"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "max_output_tokens"),
        (
            {"stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
            "obfuscation",
        ),
        ({"top_logprobs": 3}, "top_logprobs", "not supported by this server"),
        ({"prompt_cache_key": "k"}, "prompt_cache_key", "not supported by this server"),
        ({"service_tier": "priority"}, "service_tier", "auto"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content",
            "text only",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "not supported"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input.0.arguments",
            "Missing",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_file"}],
                    }
                ]
            },
            "input.0.output",
            "text only",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input.0.content.0.text",
            "Missing",
        ),
        ({"input": []}, "input", "at least 1"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        (
            {"text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}},
            "text.format.name",
            "pattern",
        ),
    ],
)
async def test_what_is_not_served_is_refused_by_name(
    http: httpx.AsyncClient, cloud: ScriptedCloud, fields: dict[str, Any], param: str, says: str
) -> None:
    response = await http.post("/v1/responses", json={"model": MODEL, "input": "hi", **fields})

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"
    assert cloud.calls == []


async def test_nulls_and_empty_values_are_no_values(
    http: httpx.AsyncClient, cloud: ScriptedCloud
) -> None:
    response = await http.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": "hi",
            "previous_response_id": None,
            "tools": None,
            "text": None,
            "metadata": None,
            "tool_choice": None,
            "include": [],
            "reasoning": {},
            "background": False,
            "prompt_cache_key": None,
            "service_tier": "auto",
        },
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"


# --- function tools -------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
CALL = ("call_1", "get_weather", '{"city": "Paris"}')


async def test_tools_and_the_turns_of_a_call_reach_cloud(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    await client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "message", "role": "assistant", "content": "Checking."},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "call_2",
                "name": "get_weather",
                "arguments": '{"city": "Oslo"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "4 C"}],
            },
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    )

    params = cloud.calls[0].request.params
    assert [tool.name for tool in params.tools] == ["get_weather"]
    assert json.loads(params.tools[0].parameters) == WEATHER["parameters"]
    assert params.tool_choice == inference_pb2.ToolChoice(
        mode=inference_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="get_weather"
    )
    assert params.parallel_tool_calls is False
    user, assistant, first, second = params.messages
    assert (user.role, assistant.role, assistant.content) == (
        inference_pb2.CHAT_ROLE_USER,
        inference_pb2.CHAT_ROLE_ASSISTANT,
        "Checking.",
    )
    # The calls join the assistant's turn; each output answers its call.
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}'),
        ("call_2", "get_weather", '{"city": "Oslo"}'),
    ]
    assert [(m.role, m.tool_call_id, m.content) for m in (first, second)] == [
        (inference_pb2.CHAT_ROLE_TOOL, "call_1", "21 C"),
        (inference_pb2.CHAT_ROLE_TOOL, "call_2", "4 C"),
    ]


@pytest.mark.parametrize(("text", "message_items"), [([], 0), (["Let me check."], 1)])
async def test_calls_are_function_call_items(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud, text: list[str], message_items: int
) -> None:
    cloud.script.text = text
    cloud.script.tool_calls = (CALL,)

    response = await client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
    )

    assert response.status == "completed"
    assert [item.type for item in response.output] == ["message"] * message_items + [
        "function_call"
    ]
    call = response.output[-1]
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments, call.status) == (*CALL, "completed")
    assert call.id == f"fc_scripted_{message_items}"
    assert response.tool_choice == "required"
    assert response.to_dict()["tools"] == [WEATHER]


async def test_streamed_calls(client: openai.AsyncOpenAI, cloud: ScriptedCloud) -> None:
    cloud.script.text = ["Let me check."]
    cloud.script.tool_calls = (CALL, ("call_2", "get_weather", '{"city": "Oslo"}'))

    stream = await client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER],
        stream=True,  # type: ignore[list-item]
    )
    events = [event async for event in stream]

    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *(
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        )
        * 2,
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [
        (0, "message"),
        (1, "function_call"),
        (2, "function_call"),
    ]
    first_call = added[1].item
    assert first_call.type == "function_call"
    assert (first_call.call_id, first_call.name, first_call.arguments) == (
        "call_1",
        "get_weather",
        "",
    )
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.item_id, e.arguments) for e in done] == [
        ("fc_scripted_1", '{"city": "Paris"}'),
        ("fc_scripted_2", '{"city": "Oslo"}'),
    ]
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == [
        "message",
        "function_call",
        "function_call",
    ]
    assert final.response.output_text == "Let me check."


async def test_a_reply_of_calls_alone_streams_no_message(
    client: openai.AsyncOpenAI, cloud: ScriptedCloud
) -> None:
    cloud.script.text = []
    cloud.script.tool_calls = (CALL,)

    async with client.responses.stream(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_response()

    assert "response.content_part.added" not in types
    [call] = final.output
    assert call.type == "function_call"
    assert call.arguments == CALL[2]
