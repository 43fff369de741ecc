"""OpenAI conformance: the official `openai` client (strict response validation,
no retries) against the whole platform in process: gateway -> cloud -> account +
network -> agent -> scripted runtime, over real HTTP and real gRPC.

Raw httpx checks the bytes where the SDK would hide them (SSE framing, headers).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import CompletionUsage
from resultity.account.v1 import api_key_service_pb2 as keys_pb

from agent.runtime.base import GenerationEvent, GenerationRequest, Started, TokenText
from core.inference import ChatRole, ToolCall, ToolChoiceMode
from core.tool_calls import render_calls
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import (
    DEFAULT_SCRIPT,
    SCRIPTED_LOGPROB,
    ScriptedRuntime,
    prompt_tokens,
    scripted_embedding,
    scripted_tokens,
)
from tests.harness import running_platform
from tests.openai_stack import CREDITS, Stack, gateway_stack

MODEL = SMOLLM2_135M.id
PRICE = SMOLLM2_135M.price
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
# "hello there": 2 words + 2 template tokens in the scripted runtime.
HELLO_PROMPT_TOKENS = 4
TOKENS = scripted_tokens(DEFAULT_SCRIPT)

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": WEATHER_PARAMETERS,
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
PARIS: Any = {"role": "user", "content": "What is the weather in Paris?"}
PARIS_ARGUMENTS = {"city": "Paris", "unit": "celsius"}
TIME: Any = {"role": "user", "content": "What time is it?"}
BOTH: Any = {"role": "user", "content": "Weather in Oslo, and the time?"}


def _tool_call_block(*calls: tuple[str, dict[str, Any]]) -> str:
    """Calls as a node writes them (core/tool_calls.py)."""
    return render_calls([ToolCall("", name, json.dumps(arguments)) for name, arguments in calls])


# What the scripted node writes for these prompts when offered tools.
TOOL_ANSWERS = {
    PARIS["content"]: _tool_call_block(("get_weather", PARIS_ARGUMENTS)),
    TIME["content"]: _tool_call_block(("get_time", {})),
    BOTH["content"]: "Checking both. "
    + _tool_call_block(("get_weather", {"city": "Oslo"}), ("get_time", {})),
}


def _charge(prompt: int, completion: int) -> int:
    return prompt * PRICE.prompt + completion * PRICE.completion


@pytest.fixture(scope="module")
def runtime() -> ScriptedRuntime:
    return ScriptedRuntime(slot_count=4, tool_answers=TOOL_ANSWERS)


@pytest.fixture(scope="module")
async def stack(postgres_dsn: str, runtime: ScriptedRuntime) -> AsyncIterator[Stack]:
    async with running_platform(postgres_dsn) as platform, gateway_stack(platform) as running:
        await platform.start_agent(runtime)
        yield running


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with stack.client() as sdk:
        yield sdk


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with stack.http() as raw:
        yield raw


# --- chat completions ----------------------------------------------------------------------


async def test_chat_completion_with_every_parameter(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "count"}]},
        ],
        max_tokens=100,
        max_completion_tokens=4,
        temperature=0.5,
        top_p=0.9,
        stop=["never"],
        seed=7,
        n=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
        user="end-user",
    )

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert [choice.index for choice in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.role == "assistant"
        assert choice.message.content == "".join(TOKENS[:4])
        assert choice.finish_reason == "length"
        assert choice.logprobs is not None
        assert choice.logprobs.content is not None
        assert [item.token for item in choice.logprobs.content] == TOKENS[:4]
        assert {item.logprob for item in choice.logprobs.content} == {SCRIPTED_LOGPROB}
        assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    # Two choices, each its own job: the prompt (4 + 3 + 3 + 3 tokens) counts twice.
    assert completion.usage == CompletionUsage(
        prompt_tokens=2 * 13, completion_tokens=8, total_tokens=34
    )


async def test_stop_as_a_string_and_json_schema(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stop="never",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
    )
    assert completion.choices[0].message.content == DEFAULT_SCRIPT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].logprobs is None


async def test_streaming_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    for index in (0, 1):
        deltas = [c for chunk in chunks for c in chunk.choices if c.index == index]
        assert deltas[0].delta.role == "assistant"
        assert "".join(d.delta.content or "" for d in deltas) == "".join(TOKENS[:3])
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
        assert deltas[-1].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == CompletionUsage(
        prompt_tokens=2 * HELLO_PROMPT_TOKENS, completion_tokens=6, total_tokens=14
    )
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1


def _frames(body: bytes) -> list[bytes]:
    """Each event's data, checking the framing byte by byte: `data: ...\\n\\n` only."""
    assert body.endswith(b"\n\n")
    frames = body[:-2].split(b"\n\n")
    for frame in frames:
        assert frame.startswith(b"data: ")
        assert b"\n" not in frame
        assert b"\r" not in frame
    return [frame[len(b"data: ") :] for frame in frames]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_bytes(http: httpx.AsyncClient, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        raw = b"".join([part async for part in response.aiter_raw()])

    frames = _frames(raw)
    assert frames[-1] == b"[DONE]"
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(frame) for frame in frames[:-1]]
    opening = {"role": "assistant", "content": ""}
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": opening, "logprobs": None, "finish_reason": None}
    ]
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1
    assert finishing[0]["choices"][0]["delta"] == {}
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
    assert "".join(text for text in contents if text) == "".join(TOKENS[:3])
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert ("usage" in chunk) is include_usage
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == {
            "prompt_tokens": HELLO_PROMPT_TOKENS,
            "completion_tokens": 3,
            "total_tokens": HELLO_PROMPT_TOKENS + 3,
        }
        assert all(chunk["usage"] is None for chunk in chunks[:-1])
    else:
        assert chunks[-1] is finishing[0]


# --- tools and roles -----------------------------------------------------------------------


async def test_required_tool_choice_returns_the_call(
    client: openai.AsyncOpenAI, runtime: ScriptedRuntime
) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=[PARIS], tools=TOOLS, tool_choice="required"
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == PARIS_ARGUMENTS
    # Billed as generated: every scripted token of the block.
    tokens = len(scripted_tokens(TOOL_ANSWERS[PARIS["content"]]))
    assert completion.usage is not None
    assert completion.usage.completion_tokens == tokens
    offered = runtime.started_jobs[-1].tool_use
    assert offered is not None
    assert (offered.mode, offered.parallel_calls) == (ToolChoiceMode.REQUIRED, True)
    assert [tool.name for tool in offered.tools] == ["get_weather", "get_time"]
    assert json.loads(offered.tools[0].parameters) == WEATHER_PARAMETERS


async def test_named_tool_choice_forces_that_function(
    client: openai.AsyncOpenAI, runtime: ScriptedRuntime
) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[TIME],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )

    [call] = completion.choices[0].message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert completion.choices[0].finish_reason == "tool_calls"
    offered = runtime.started_jobs[-1].tool_use
    assert offered is not None
    assert (offered.mode, offered.function, offered.parallel_calls) == (
        ToolChoiceMode.FUNCTION,
        "get_time",
        False,
    )


async def test_auto_streams_text_then_parallel_calls(
    client: openai.AsyncOpenAI, runtime: ScriptedRuntime
) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[BOTH], tools=TOOLS, stream=True
    )
    deltas = [choice for chunk in [c async for c in stream] for choice in chunk.choices]

    assert "".join(d.delta.content or "" for d in deltas) == "Checking both. "
    pieces = [call for d in deltas for call in d.delta.tool_calls or ()]
    # Per call: its index, id, type and name first (arguments empty), then arguments.
    firsts = [piece for piece in pieces if piece.id]
    assert [(p.index, p.type, p.function and p.function.name) for p in firsts] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert all(p.function is not None and p.function.arguments == "" for p in firsts)
    rest = [piece for piece in pieces if not piece.id]
    assert all(p.type is None and p.function and p.function.name is None for p in rest)
    arguments = {
        index: "".join(p.function.arguments or "" for p in rest if p.index == index and p.function)
        for index in (0, 1)
    }
    assert len([p for p in rest if p.index == 0]) > 1  # the arguments come in pieces
    assert [json.loads(text) for text in arguments.values()] == [{"city": "Oslo"}, {}]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]
    offered = runtime.started_jobs[-1].tool_use
    assert offered is not None
    assert offered.mode is ToolChoiceMode.AUTO


async def test_auto_may_answer_in_text(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS)

    assert completion.choices[0].message.content == DEFAULT_SCRIPT
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_none_offers_no_tools(
    client: openai.AsyncOpenAI, runtime: ScriptedRuntime, stream: bool
) -> None:
    if stream:
        chunks = await client.chat.completions.create(
            model=MODEL, messages=[PARIS], tools=TOOLS, tool_choice="none", stream=True
        )
        deltas = [choice for chunk in [c async for c in chunks] for choice in chunk.choices]
        text = "".join(d.delta.content or "" for d in deltas)
        assert not any(d.delta.tool_calls for d in deltas)
        reasons = [d.finish_reason for d in deltas if d.finish_reason]
    else:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[PARIS], tools=TOOLS, tool_choice="none"
        )
        text = completion.choices[0].message.content or ""
        assert completion.choices[0].message.tool_calls is None
        reasons = [completion.choices[0].finish_reason]

    assert (text, reasons) == (DEFAULT_SCRIPT, ["stop"])
    assert runtime.started_jobs[-1].tool_use is None


async def test_streamed_tool_call_bytes(http: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": [PARIS],
        "tools": TOOLS,
        "tool_choice": "required",
        "stream": True,
    }
    response = await http.post("/v1/chat/completions", json=body)

    chunks = [json.loads(frame) for frame in _frames(response.content)[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    calls = [delta["tool_calls"] for delta in deltas if "tool_calls" in delta]
    first = calls[0]
    assert first == [
        {
            "index": 0,
            "id": first[0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    assert all(list(call[0]) == ["index", "function"] for call in calls[1:])
    assert all(list(call[0]["function"]) == ["arguments"] for call in calls[1:])
    arguments = "".join(call[0]["function"]["arguments"] for call in calls[1:])
    assert json.loads(arguments) == PARIS_ARGUMENTS
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


async def test_round_trip_with_the_tool_result(
    client: openai.AsyncOpenAI, runtime: ScriptedRuntime
) -> None:
    asked = await client.chat.completions.create(
        model=MODEL, messages=[PARIS], tools=TOOLS, tool_choice="required"
    )
    called = asked.choices[0].message
    [call] = called.tool_calls or []
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}

    answered = await client.chat.completions.create(
        model=MODEL,
        messages=[PARIS, called.model_dump(exclude_none=True), result],  # type: ignore[list-item]
        tools=TOOLS,
    )

    assert answered.choices[0].message.content == DEFAULT_SCRIPT
    assert answered.choices[0].finish_reason == "stop"
    history = runtime.started_jobs[-1].messages
    assert [message.role for message in history] == [
        ChatRole.USER,
        ChatRole.ASSISTANT,
        ChatRole.TOOL,
    ]
    assert history[1].tool_calls == (ToolCall(call.id, "get_weather", call.function.arguments),)
    assert (history[2].tool_call_id, history[2].content) == (call.id, '{"temperature": 21}')


async def test_every_role(client: openai.AsyncOpenAI, runtime: ScriptedRuntime) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}], "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [{"type": "text", "text": "sun"}],
            },
            {"role": "assistant", "content": "Sunny.", "function_call": None},
            {"role": "user", "content": "and the time?"},
            {"role": "assistant", "function_call": {"name": "get_time", "arguments": "{}"}},
            {"role": "function", "name": "get_time", "content": "noon"},
        ],
    )

    assert completion.choices[0].message.content == DEFAULT_SCRIPT
    received = [
        (message.role, message.content, message.name, message.tool_call_id)
        for message in runtime.started_jobs[-1].messages
    ]
    assert received == [
        (ChatRole.SYSTEM, "Be brief.", "", ""),
        (ChatRole.DEVELOPER, "Use tools.", "", ""),
        (ChatRole.USER, "weather?", "ann", ""),
        (ChatRole.ASSISTANT, "", "", ""),
        (ChatRole.TOOL, "sun", "", "call_1"),
        (ChatRole.ASSISTANT, "Sunny.", "", ""),
        (ChatRole.USER, "and the time?", "", ""),
        (ChatRole.ASSISTANT, "", "", ""),
        # A legacy function result: a tool result that names its function.
        (ChatRole.TOOL, "noon", "get_time", ""),
    ]
    calls = [message.tool_calls for message in runtime.started_jobs[-1].messages]
    assert calls[3] == (ToolCall("call_1", "get_weather", '{"city": "Rome"}'),)
    assert calls[7] == (ToolCall("", "get_time", "{}"),)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "stop": ["x"]}, "stop"),
        ({"tools": TOOLS, "logprobs": True}, "logprobs"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
        (
            {"messages": [PARIS, {"role": "tool", "tool_call_id": "call_x", "content": "?"}]},
            "messages.1.tool_call_id",
        ),
    ],
)
async def test_tools_that_cannot_be_honoured_are_refused(
    client: openai.AsyncOpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(**{"model": MODEL, "messages": [PARIS], **fields})
    assert _envelope(raised.value)["param"] == param


# --- text completions, models --------------------------------------------------------------


async def test_text_completion_string_and_list(client: openai.AsyncOpenAI) -> None:
    single = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=2)
    several = await client.completions.create(
        model=MODEL, prompt=["once upon", "a time"], max_tokens=2, logprobs=1
    )

    assert single.object == "text_completion"
    assert [choice.text for choice in single.choices] == ["".join(TOKENS[:2])]
    assert single.usage == CompletionUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert [choice.index for choice in several.choices] == [0, 1]
    for choice in several.choices:
        assert choice.logprobs is not None
        assert choice.logprobs.tokens == TOKENS[:2]
        assert choice.logprobs.token_logprobs == [SCRIPTED_LOGPROB] * 2


async def test_text_completion_stream_bytes(http: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "once upon", "max_tokens": 2, "stream": True}
    response = await http.post("/v1/completions", json=body)

    frames = _frames(response.content)
    assert frames[-1] == b"[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(TOKENS[:2])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [model async for model in client.models.list()]
    assert [model.id for model in models] == [MODEL]

    model = await client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", SMOLLM2_135M.owned_by)

    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found"


async def test_embeddings(client: openai.AsyncOpenAI, stack: Stack) -> None:
    before = await stack.platform.balance(stack.customer)
    floats = await client.embeddings.create(
        model=MODEL, input="one two three", encoding_format="float"
    )
    # Unasked, the SDK requests base64 and decodes it after parsing, which its strict
    # validation (of the undecoded body) cannot follow.
    async with openai.AsyncOpenAI(
        base_url=f"{stack.base_url}/v1", api_key=stack.customer.api_key, max_retries=0
    ) as lenient:
        encoded = await lenient.embeddings.create(model=MODEL, input=["one two three", "four"])

    assert floats.data[0].embedding == list(scripted_embedding("one two three"))
    assert [item.embedding for item in encoded.data] == [
        list(scripted_embedding("one two three")),
        list(scripted_embedding("four")),
    ]
    # A raw prompt is one token per word plus BOS in the scripted runtime.
    assert (encoded.usage.prompt_tokens, encoded.usage.total_tokens) == (6, 6)
    spent = (
        before.available_micro_credits
        - (await stack.platform.balance(stack.customer)).available_micro_credits
    )
    assert spent == (4 + 6) * PRICE.prompt


# --- the Responses API ---------------------------------------------------------------------


async def test_responses_whole_and_billed_as_a_chat_completion(
    client: openai.AsyncOpenAI, stack: Stack
) -> None:
    before = await stack.platform.balance(stack.customer)
    response = await client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[{"role": "user", "content": "hello there"}],
        max_output_tokens=3,
        text={"format": {"type": "json_schema", "name": "any", "schema": {"type": "object"}}},
    )
    after = await stack.platform.balance(stack.customer)

    assert response.object == "response"
    assert response.status == "incomplete"
    assert response.output_text == "".join(TOKENS[:3])
    assert response.usage is not None
    # The instructions are a system message: two words and two template tokens.
    prompt = HELLO_PROMPT_TOKENS + 4
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt, 3)
    charged = before.available_micro_credits - after.available_micro_credits
    assert charged == _charge(prompt, 3)


async def test_responses_streamed_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(model=MODEL, input="hello there", stream=True)
    events = [event async for event in stream]

    assert [event.type for event in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert [event.type for event in events[-4:]] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_SCRIPT
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == DEFAULT_SCRIPT
    assert completed.response.usage is not None
    assert completed.response.usage.output_tokens == len(TOKENS)


# The Responses API's flat form of the chat tools above.
RESPONSE_TOOLS: list[Any] = [{"type": "function", **tool["function"]} for tool in TOOLS]


async def test_responses_calls_a_function_and_takes_its_output(
    client: openai.AsyncOpenAI, runtime: ScriptedRuntime
) -> None:
    asked = await client.responses.create(
        model=MODEL, input=[PARIS], tools=RESPONSE_TOOLS, tool_choice="required"
    )
    [call] = asked.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == PARIS_ARGUMENTS
    assert call.call_id.startswith("call_")

    answered = await client.responses.create(
        model=MODEL,
        input=[
            PARIS,
            call.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"},
        ],
        tools=RESPONSE_TOOLS,
    )

    assert answered.output_text == DEFAULT_SCRIPT
    history = runtime.started_jobs[-1].messages
    assert [message.role for message in history] == [
        ChatRole.USER,
        ChatRole.ASSISTANT,
        ChatRole.TOOL,
    ]
    assert history[1].tool_calls == (ToolCall(call.call_id, "get_weather", call.arguments),)
    assert (history[2].tool_call_id, history[2].content) == (call.call_id, "21 C")


async def test_responses_stream_a_function_call(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(
        model=MODEL,
        input=[TIME],
        tools=RESPONSE_TOOLS,
        tool_choice={"type": "function", "name": "get_time"},
    ) as stream:
        types = [event.type async for event in stream]
        final = await stream.get_final_response()

    assert "response.function_call_arguments.delta" in types
    assert types[-2:] == ["response.output_item.done", "response.completed"]
    [call] = final.output
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_time", {})


# --- errors and headers --------------------------------------------------------------------


def _envelope(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": SMOLLM2_135M.context_length + 1}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        # The prompt is longer than the context: the node refuses it.
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ],
)
async def test_invalid_requests_are_400_naming_the_param(
    client: openai.AsyncOpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(**{"model": MODEL, "messages": HELLO, **fields})

    envelope = _envelope(raised.value)
    assert envelope["type"] == "invalid_request_error"
    assert envelope["param"] == param


async def test_region_header_narrows_the_nodes(client: openai.AsyncOpenAI) -> None:
    # The module's node declares no region, so none qualifies for a named one.
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_headers={"x-resultity-region": "eu-west"}
        )
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.BadRequestError) as invalid:
        await client.embeddings.create(
            model=MODEL, input="x", extra_headers={"x-resultity-region": "Not A Region"}
        )
    # A header is no field of the request: no param, the message names it.
    assert _envelope(invalid.value)["param"] is None
    assert "x-resultity-region" in _envelope(invalid.value)["message"]


async def test_wrong_key_is_401(stack: Stack) -> None:
    async with stack.client(api_key="rsk_not-a-real-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as raised:
            await sdk.chat.completions.create(model=MODEL, messages=HELLO)
    assert _envelope(raised.value)["code"] == "invalid_api_key"


async def test_keys_outside_their_scope_or_models_are_403(stack: Stack) -> None:
    management_only = await stack.key(scopes=[keys_pb.API_KEY_SCOPE_MANAGEMENT])
    other_model_only = await stack.key(allowed_models=["some-other-model"])
    for key in (management_only, other_model_only):
        async with stack.client(api_key=key) as sdk:
            with pytest.raises(openai.PermissionDeniedError) as raised:
                await sdk.chat.completions.create(model=MODEL, messages=HELLO)
        assert raised.value.status_code == 403


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await client.chat.completions.create(model="no-such-model", messages=HELLO)
    envelope = _envelope(raised.value)
    assert (envelope["code"], envelope["param"]) == ("model_not_found", "model")


async def test_no_credit_is_429_insufficient_quota_not_to_retry(stack: Stack) -> None:
    broke = await stack.platform.customer(credits=0)
    async with stack.client(api_key=broke.api_key) as sdk:
        with pytest.raises(openai.RateLimitError) as raised:
            await sdk.chat.completions.create(model=MODEL, messages=HELLO)
    assert _envelope(raised.value)["code"] == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"


async def test_every_response_has_a_request_id_and_the_overhead(
    http: httpx.AsyncClient,
) -> None:
    responses = [
        await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO}),
        await http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "stream": True}
        ),
        await http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}),
        await http.post("/v1/embeddings", json={"model": MODEL, "input": "x"}),
        await http.get("/v1/models"),
        await http.get(f"/v1/models/{MODEL}"),
        await http.get("/openapi.json"),
        await http.post("/v1/chat/completions", json={"model": MODEL}),
        await http.post("/v1/chat/completions", json={"model": "nope", "messages": HELLO}),
        await http.get("/v1/unknown"),
    ]
    ids = [response.headers["x-request-id"] for response in responses]
    assert len(set(ids)) == len(ids)
    for response in responses:
        assert float(response.headers["x-resultity-overhead-ms"]) >= 0.0


# --- platforms set up for one test ---------------------------------------------------------


async def test_no_serving_node_is_503(postgres_dsn: str) -> None:
    async with running_platform(postgres_dsn) as platform, gateway_stack(platform) as stack:
        async with stack.client() as sdk:
            with pytest.raises(openai.InternalServerError) as raised:
                await sdk.chat.completions.create(model=MODEL, messages=HELLO)
        assert raised.value.status_code == 503
        assert (await platform.balance(stack.customer)).available_micro_credits == CREDITS


async def test_rate_limit_under_a_burst(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESULTITY_RATE_LIMIT_KEY_REQUESTS_PER_MINUTE", "2")
    async with running_platform(postgres_dsn) as platform, gateway_stack(platform) as stack:
        await platform.start_agent(ScriptedRuntime(slot_count=4))
        async with stack.client() as sdk:

            async def call() -> object:
                try:
                    return await sdk.chat.completions.with_raw_response.create(
                        model=MODEL, messages=HELLO, max_tokens=1
                    )
                except openai.RateLimitError as error:
                    return error

            outcomes = await asyncio.gather(*(call() for _ in range(6)))

    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    served = [o for o in outcomes if not isinstance(o, openai.RateLimitError)]
    assert (len(served), len(limited)) == (2, 4)
    for error in limited:
        assert _envelope(error)["code"] == "rate_limit_exceeded"
        assert int(error.response.headers["retry-after"]) >= 1
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    for raw in served:
        assert raw.headers["x-ratelimit-limit-requests"] == "2"  # type: ignore[attr-defined]


class StallingRuntime(ScriptedRuntime):
    """Streams the first ``deliver`` scripted tokens, then waits until cancelled."""

    def __init__(self, deliver: int) -> None:
        super().__init__()
        self.deliver = deliver
        self.cancelled = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.started_jobs.append(request)
        yield Started(prompt_tokens(request))
        for index in range(self.deliver):
            yield TokenText(TOKENS[index], 1, (index,))
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


async def test_disconnect_mid_stream_settles_exactly_what_was_delivered(
    postgres_dsn: str,
) -> None:
    runtime = StallingRuntime(deliver=3)
    async with running_platform(postgres_dsn) as platform, gateway_stack(platform) as stack:
        await platform.start_agent(runtime)
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        async with (
            stack.http() as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            seen = ""
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    seen += delta.get("content") or ""
                if seen == "".join(TOKENS[:3]):
                    break  # leaves the stream: the client disconnects
        # The job is cancelled on the node and the hold settles for 3 tokens (the
        # timeouts only bound a broken test).
        await asyncio.wait_for(runtime.cancelled.wait(), 10)

        async def settled() -> bool:
            balance = await platform.balance(stack.customer)
            return balance.held_micro_credits == 0

        async with asyncio.timeout(10):
            while not await settled():  # noqa: ASYNC110 - polls the ledger over gRPC
                await asyncio.sleep(0.02)
        balance = await platform.balance(stack.customer)
        assert balance.available_micro_credits == CREDITS - _charge(HELLO_PROMPT_TOKENS, 3)
