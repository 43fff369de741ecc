"""A chat completion's tool calls, read out of its choices' text as it streams.

A job that offers tools writes its calls in the text (core/tool_calls.py); the
caller gets them as OpenAI's tool calls: each with an id cloud assigns, its
name first, then its arguments in pieces, and the choice's finish reason
``tool_calls``. Billing is untouched: it counts the job's tokens, not these
events.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator

from core.errors import JobFailed
from core.inference import FinishReason, ToolUse
from core.tool_calls import (
    ArgumentsPiece,
    CallStart,
    MalformedToolCall,
    ParsedPiece,
    TextPiece,
    ToolCallParser,
)
from server.cloud.requests import (
    ChoiceFinished,
    ChoiceStarted,
    CompletionEvent,
    ContentDelta,
    ToolCallDelta,
)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def with_tool_calls(
    events: AsyncGenerator[CompletionEvent, None], tool_use: ToolUse
) -> AsyncGenerator[CompletionEvent, None]:
    """``events`` with each choice's text split into content and ToolCallDeltas.

    Raises JobFailed when a node's text breaks the format (its grammar rules that
    out; a node that ignored it is at fault)."""
    parsers: dict[int, ToolCallParser] = {}
    async with contextlib.aclosing(events):
        async for event in events:
            try:
                if isinstance(event, ChoiceStarted):
                    parsers[event.index] = ToolCallParser(tool_use)
                    yield event
                elif isinstance(event, ContentDelta):
                    for converted in _events(event.index, parsers[event.index].feed(event.text)):
                        yield converted
                elif isinstance(event, ChoiceFinished):
                    parser = parsers.pop(event.index)
                    complete = event.finish_reason is FinishReason.STOP
                    for converted in _events(event.index, parser.finish(complete=complete)):
                        yield converted
                    reason = event.finish_reason
                    if parser.calls and reason is FinishReason.STOP:
                        reason = FinishReason.TOOL_CALLS
                    yield ChoiceFinished(event.index, reason)
                else:
                    yield event
            except MalformedToolCall as error:
                raise JobFailed(f"the node wrote a malformed tool call: {error}") from None


def _events(index: int, pieces: list[ParsedPiece]) -> list[CompletionEvent]:
    converted: list[CompletionEvent] = []
    for piece in pieces:
        if isinstance(piece, TextPiece):
            converted.append(ContentDelta(piece.text, index))
        elif isinstance(piece, CallStart):
            converted.append(ToolCallDelta(index, piece.index, call_id(), piece.name))
        elif isinstance(piece, ArgumentsPiece):
            converted.append(ToolCallDelta(index, piece.index, arguments=piece.text))
    return converted
