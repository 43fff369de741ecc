"""The tool-call block a node writes: rendered, read back as it streams in any
split, refused when it breaks the format or the tool choice; and cloud's events
and checks for requests with tools."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncGenerator

import pytest

from core.errors import InvalidArgument, JobFailed
from core.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    FunctionTool,
    ToolCall,
    ToolChoiceMode,
    ToolUse,
)
from core.tool_calls import (
    ArgumentsPiece,
    CallStart,
    MalformedToolCall,
    ParsedPiece,
    TextPiece,
    ToolCallParser,
    render_calls,
)
from server.cloud.pricing import prompt_token_bound
from server.cloud.requests import (
    ChatRequest,
    ChoiceFinished,
    ChoiceStarted,
    CompletionEvent,
    ContentDelta,
    ToolCallDelta,
    validate,
)
from server.cloud.tool_call_events import with_tool_calls
from server.network.catalog import SMOLLM2_135M

WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
)
TIME = FunctionTool("get_time")
AUTO = ToolUse((WEATHER, TIME))
CALLS = (
    ToolCall("", "get_weather", '{"city": "Rio \\"de\\" {Janeiro}", "days": [1, {"x": 2}]}'),
    ToolCall("", "get_time", "{}"),
)
BLOCK = render_calls(CALLS)


def _read(text: str, tool_use: ToolUse, cuts: list[int], complete: bool = True) -> list[object]:
    """The pieces of ``text`` fed in parts split at ``cuts``, merged per kind and call."""
    parser = ToolCallParser(tool_use)
    pieces: list[ParsedPiece] = []
    bounds = [0, *cuts, len(text)]
    for start, end in itertools.pairwise(bounds):
        pieces.extend(parser.feed(text[start:end]))
    pieces.extend(parser.finish(complete=complete))
    merged: list[object] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if isinstance(piece, TextPiece) and isinstance(last, TextPiece):
            merged[-1] = TextPiece(last.text + piece.text)
        elif (
            isinstance(piece, ArgumentsPiece)
            and isinstance(last, ArgumentsPiece)
            and last.index == piece.index
        ):
            merged[-1] = ArgumentsPiece(piece.index, last.text + piece.text)
        else:
            merged.append(piece)
    return merged


EXPECTED: list[object] = [
    CallStart(0, "get_weather"),
    ArgumentsPiece(0, json.dumps(json.loads(CALLS[0].arguments), ensure_ascii=False)),
    CallStart(1, "get_time"),
    ArgumentsPiece(1, "{}"),
]


def test_the_block_reads_back_split_anywhere() -> None:
    text = "Let me look <that> up. " + BLOCK
    for cut in range(len(text) + 1):
        assert _read(text, AUTO, [cut]) == [TextPiece("Let me look <that> up. "), *EXPECTED]
    assert _read(text, AUTO, list(range(1, len(text)))) == [
        TextPiece("Let me look <that> up. "),
        *EXPECTED,
    ]


def test_a_call_is_announced_before_its_arguments_arrive() -> None:
    parser = ToolCallParser(ToolUse((WEATHER,), ToolChoiceMode.REQUIRED))
    assert parser.feed('<tool_call>[\n{"name": "get_weather"') == [CallStart(0, "get_weather")]
    assert parser.feed(', "arguments": {"ci') == [ArgumentsPiece(0, '{"ci')]
    assert parser.feed('ty": "Oslo"}}\n]</tool_call>') == [ArgumentsPiece(0, 'ty": "Oslo"}')]
    assert parser.finish(complete=True) == []
    assert parser.calls == 1


def test_text_that_only_looks_like_the_opener_is_text() -> None:
    text = "a <tool_ b <tool_call"
    assert _read(text, AUTO, [4, 9]) == [TextPiece(text)]


def test_a_reply_cut_by_max_tokens_keeps_what_was_written() -> None:
    text = BLOCK[: BLOCK.index("Janeiro")]
    assert _read(text, AUTO, [], complete=False) == [
        CallStart(0, "get_weather"),
        ArgumentsPiece(0, '{"city": "Rio \\"de\\" {'),
    ]


@pytest.mark.parametrize(
    ("tool_use", "text", "reason"),
    [
        (AUTO, BLOCK + " and more", "follows"),
        (AUTO, BLOCK[:-3], "not closed"),
        (AUTO, render_calls([ToolCall("", "other", "{}")]), "not one of the tools"),
        (AUTO, '<tool_call>[\n{"name": "get_time", "arguments": []}\n]</tool_call>', "object"),
        (AUTO, '<tool_call>[\n{"arguments": {}, "name": "get_time"}\n]</tool_call>', "name"),
        (AUTO, '<tool_call>[\n{"name": "get_time", "arguments": {"a": 01}}\n]</tool_call>', "JSON"),
        (ToolUse((WEATHER, TIME), ToolChoiceMode.REQUIRED), "I will not.", "expected"),
        (ToolUse((WEATHER, TIME), ToolChoiceMode.REQUIRED), "", "not closed"),
        (ToolUse((WEATHER, TIME), ToolChoiceMode.FUNCTION, "get_weather"), BLOCK, "tool choice"),
        (ToolUse((WEATHER, TIME), parallel_calls=False), BLOCK, "more tool calls"),
    ],
)
def test_what_the_grammar_rules_out_is_malformed(tool_use: ToolUse, text: str, reason: str) -> None:
    with pytest.raises(MalformedToolCall, match=reason):
        _read(text, tool_use, [])


def test_history_calls_render_as_the_model_writes_them() -> None:
    rendered = render_calls([ToolCall("c1", "get_time", "{}"), ToolCall("c2", "f", "not json")])
    assert rendered == (
        '<tool_call>[\n{"name": "get_time", "arguments": {}},\n'
        '{"name": "f", "arguments": "not json"}\n]</tool_call>'
    )


# --- cloud --------------------------------------------------------------------------------


async def _events(*events: CompletionEvent) -> AsyncGenerator[CompletionEvent, None]:
    for event in events:
        yield event


async def _split(tool_use: ToolUse, *events: CompletionEvent) -> list[CompletionEvent]:
    return [event async for event in with_tool_calls(_events(*events), tool_use)]


async def test_cloud_turns_the_text_into_tool_call_events() -> None:
    split = await _split(
        AUTO,
        ChoiceStarted(0),
        ContentDelta("Sure. <tool", 0),
        ContentDelta('_call>[\n{"name": "get_time", "arguments": {}}\n]</tool_call>', 0),
        ChoiceFinished(0, FinishReason.STOP),
    )

    assert split[:2] == [ChoiceStarted(0), ContentDelta("Sure. ", 0)]
    opened = split[2]
    assert isinstance(opened, ToolCallDelta)
    assert opened.id.startswith("call_")
    assert split[2:] == [
        ToolCallDelta(0, 0, opened.id, "get_time"),
        ToolCallDelta(0, 0, arguments="{}"),
        ChoiceFinished(0, FinishReason.TOOL_CALLS),
    ]


async def test_a_choice_without_calls_finishes_as_it_did() -> None:
    split = await _split(
        AUTO, ChoiceStarted(0), ContentDelta("Hi", 0), ChoiceFinished(0, FinishReason.LENGTH)
    )
    assert split == [
        ChoiceStarted(0),
        ContentDelta("Hi", 0),
        ChoiceFinished(0, FinishReason.LENGTH),
    ]


async def test_a_malformed_block_fails_the_job() -> None:
    with pytest.raises(JobFailed, match="malformed tool call"):
        await _split(
            ToolUse((TIME,), ToolChoiceMode.REQUIRED),
            ChoiceStarted(0),
            ContentDelta("plain text", 0),
        )


def _chat(*messages: ChatMessage, **fields: object) -> ChatRequest:
    return ChatRequest(model="m", messages=messages, **fields)  # type: ignore[arg-type]


USER = ChatMessage(ChatRole.USER, "hi")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (_chat(USER, tool_choice=ToolChoiceMode.AUTO), "tool_choice"),
        (_chat(USER, parallel_tool_calls=True), "parallel_tool_calls"),
        (_chat(USER, tools=(FunctionTool("a b"),)), "tools.0.function.name"),
        (_chat(USER, tools=(TIME,) * 129), "tools"),
        (
            _chat(
                USER,
                tools=tuple(
                    FunctionTool(f"t{i}", parameters=json.dumps({"description": "x" * 9000}))
                    for i in range(4)
                ),
            ),
            "tools",
        ),
        (_chat(USER, tools=(FunctionTool("f", parameters="[]"),)), "tools.0.function.parameters"),
        (
            _chat(
                USER,
                tools=(TIME,),
                tool_choice=ToolChoiceMode.FUNCTION,
                tool_choice_function="get_weather",
            ),
            "tool_choice",
        ),
        (_chat(USER, tools=(TIME,), stop=("x",)), "stop"),
        (_chat(USER, tools=(TIME,), logprobs=True), "logprobs"),
        (_chat(ChatMessage(ChatRole.TOOL, "r", tool_call_id="c9")), "messages.0.tool_call_id"),
        (_chat(ChatMessage(ChatRole.TOOL, "r")), "messages.0.tool_call_id"),
        (_chat(ChatMessage(ChatRole.USER, "r", tool_call_id="c")), "messages.0.tool_call_id"),
        (
            _chat(ChatMessage(ChatRole.USER, "", tool_calls=(ToolCall("c", "f", "{}"),))),
            "messages.0.tool_calls",
        ),
        (
            _chat(ChatMessage(ChatRole.ASSISTANT, "", tool_calls=(ToolCall("c", "", "{}"),))),
            "messages.0.tool_calls.0.function.name",
        ),
    ],
)
def test_cloud_refuses_what_it_cannot_honour(request_: ChatRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(request_)
    assert raised.value.metadata == {"field": field}


def test_tool_choice_none_offers_nothing_and_allows_what_tools_exclude() -> None:
    request = _chat(USER, tools=(TIME,), tool_choice=ToolChoiceMode.NONE, stop=("x",))
    validate(request)
    assert request.tool_use is None
    assert _chat(USER, tools=(TIME,), parallel_tool_calls=False).tool_use == ToolUse(
        (TIME,), ToolChoiceMode.AUTO, "", False
    )


def test_a_conversation_with_calls_and_results_is_valid() -> None:
    validate(
        _chat(
            USER,
            ChatMessage(ChatRole.ASSISTANT, "", tool_calls=(ToolCall("c1", "get_time", "{}"),)),
            ChatMessage(ChatRole.TOOL, "noon", tool_call_id="c1"),
            ChatMessage(ChatRole.TOOL, "noon", name="get_time"),
            tools=(TIME,),
        )
    )


def test_the_prompt_bound_covers_tools_and_calls() -> None:
    plain = prompt_token_bound((USER,), SMOLLM2_135M)
    with_tools = prompt_token_bound((USER,), SMOLLM2_135M, (WEATHER, TIME))
    called = ChatMessage(ChatRole.ASSISTANT, "", tool_calls=CALLS)
    assert with_tools > plain + 2 * len(WEATHER.parameters)
    assert prompt_token_bound((USER, called), SMOLLM2_135M) > plain + len(BLOCK)
