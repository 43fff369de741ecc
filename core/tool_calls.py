"""How a node writes tool calls in a job's text, and how cloud reads them back.

A job that offers tools (``core.inference.ToolUse``) ends, when the model calls
any, in one block of the SmolLM2 family's tool-call format, after whatever text
the model wrote first (tool choice AUTO only; REQUIRED and FUNCTION start with
the block)::

    <tool_call>[
    {"name": "get_weather", "arguments": {"city": "Paris"}},
    {"name": "get_time", "arguments": {}}
    ]</tool_call>

The node generates the block under a grammar built from the tools' schemas, so
the names are the tools', the arguments parse and match, and nothing follows
the block. To the network it is text like any other: relayed, signed, billed
per token and continued on another node after a failover. Cloud turns it into
OpenAI's tool calls as it streams (``ToolCallParser``), and refuses a block
that breaks the format (a node that did not follow the grammar).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable
from dataclasses import dataclass

from core.inference import ToolCall, ToolChoiceMode, ToolUse

OPENER = "<tool_call>"
CLOSER = "</tool_call>"
# Calls one turn may make when parallel calls are allowed.
MAX_PARALLEL_CALLS = 8
# Bounds on what a node adds to the prompt in UTF-8 bytes, for cloud's token bound:
# the instructions that present the tools (once), and the markup around each tool's
# definition, each call and each block of calls or tool result in the history.
TOOL_PROMPT_OVERHEAD_BYTES = 1024
MARKUP_OVERHEAD_BYTES = 64


def arguments_json(arguments: str) -> str:
    """A call's arguments as the block writes them: the JSON compacted the way the
    grammar lays it out, or, for text that is no JSON (a caller's history may hold
    anything), that text as a JSON string."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = arguments
    return json.dumps(value, ensure_ascii=False)


def render_calls(calls: Iterable[ToolCall]) -> str:
    """An assistant turn's calls as the block the model would have written."""
    lines = ",\n".join(
        f'{{"name": {json.dumps(call.name)}, "arguments": {arguments_json(call.arguments)}}}'
        for call in calls
    )
    return f"{OPENER}[\n{lines}\n]{CLOSER}"


class MalformedToolCall(ValueError):
    """The text breaks the tool-call format or the request's tool choice."""


@dataclass(frozen=True, slots=True)
class TextPiece:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call's name is known; its arguments follow."""

    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsPiece:
    index: int
    text: str


ParsedPiece = TextPiece | CallStart | ArgumentsPiece
# A parsing coroutine: it is sent one character at a time.
_Chars = Generator[None, str, None]


class ToolCallParser:
    """Splits a job's streamed text into content and tool calls.

    ``feed`` takes the text as it arrives and returns what can be told so far:
    text that cannot begin the block is released at once, a call as soon as its
    name is complete, then its arguments piece by piece. ``finish`` ends it.
    Raises MalformedToolCall for text the grammar would not have produced.
    """

    def __init__(self, tool_use: ToolUse) -> None:
        self._tool_use = tool_use
        self._names = frozenset(tool.name for tool in tool_use.tools)
        self._out: list[ParsedPiece] = []
        self._arguments: list[str] = []  # of the call being read, not yet emitted
        self._call_arguments: list[str] = []  # of the call being read, all of it
        self._calls = 0
        # Text that may be the start of the block (AUTO only).
        self._pending = ""
        self._block: _Chars | None = None
        self._closed = False
        if tool_use.mode is not ToolChoiceMode.AUTO:
            self._start_block(expect_opener=True)

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> list[ParsedPiece]:
        if self._block is None:
            buffer = self._pending + text
            at = buffer.find(OPENER)
            if at < 0:
                keep = _prefix_overlap(buffer, OPENER)
                self._pending = buffer[len(buffer) - keep :]
                self._emit_text(buffer[: len(buffer) - keep])
                return self._take()
            self._pending = ""
            self._emit_text(buffer[:at])
            self._start_block(expect_opener=False)
            text = buffer[at + len(OPENER) :]
        for char in text:
            self._send(char)
        return self._take()

    def finish(self, *, complete: bool) -> list[ParsedPiece]:
        """The text ended; ``complete``: on the model's own end (not cut short by
        max_tokens), when an unfinished block (REQUIRED and FUNCTION: a reply without
        one) is malformed."""
        self._emit_text(self._pending)
        self._pending = ""
        if complete and self._block is not None and not self._closed:
            raise MalformedToolCall("the tool call block is not closed")
        self._flush_arguments()
        return self._take()

    # --- the block, one character at a time ------------------------------------------

    def _start_block(self, *, expect_opener: bool) -> None:
        self._block = self._read_block(expect_opener)
        next(self._block)

    def _send(self, char: str) -> None:
        if self._closed:
            if not char.isspace():
                raise MalformedToolCall("text follows the tool call block")
            return
        assert self._block is not None
        try:
            self._block.send(char)
        except StopIteration:
            self._closed = True

    def _read_block(self, expect_opener: bool) -> _Chars:
        if expect_opener:
            yield from _literal(OPENER)
        yield from _literal("[")
        while True:
            for token in ("{", '"name"', ":", '"'):
                yield from _literal(token)
            name = yield from _name()
            self._start_call(name)
            for token in (",", '"arguments"', ":"):
                yield from _literal(token)
            yield from self._read_arguments()
            self._end_call()
            yield from _literal("}")
            separator = yield from _token_start()
            if separator == "]":
                break
            if separator != ",":
                raise MalformedToolCall(f"expected ',' or ']' after a call, got {separator!r}")
        yield from _literal(CLOSER)

    def _start_call(self, name: str) -> None:
        tool_use = self._tool_use
        if name not in self._names:
            raise MalformedToolCall(f"a call of {name!r}, which is not one of the tools")
        if tool_use.mode is ToolChoiceMode.FUNCTION and name != tool_use.function:
            raise MalformedToolCall(f"a call of {name!r}; the tool choice is {tool_use.function!r}")
        single = tool_use.mode is ToolChoiceMode.FUNCTION or not tool_use.parallel_calls
        if self._calls >= (1 if single else MAX_PARALLEL_CALLS):
            raise MalformedToolCall("more tool calls than the request allows")
        self._out.append(CallStart(self._calls, name))
        self._calls += 1

    def _read_arguments(self) -> _Chars:
        """A JSON object, passed on as it comes."""
        char = yield from _token_start()
        if char != "{":
            raise MalformedToolCall("a call's arguments must be a JSON object")
        depth, in_string, escaped = 0, False, False
        while True:
            self._arguments.append(char)
            self._call_arguments.append(char)
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return
            char = yield

    def _end_call(self) -> None:
        text = "".join(self._call_arguments)
        self._call_arguments.clear()
        try:
            json.loads(text)
        except ValueError as error:
            raise MalformedToolCall(f"a call's arguments are not JSON: {error}") from None
        self._flush_arguments()

    # --- output ----------------------------------------------------------------------

    def _emit_text(self, text: str) -> None:
        if text:
            self._out.append(TextPiece(text))

    def _flush_arguments(self) -> None:
        if self._arguments:
            self._out.append(ArgumentsPiece(self._calls - 1, "".join(self._arguments)))
            self._arguments.clear()

    def _take(self) -> list[ParsedPiece]:
        self._flush_arguments()
        out, self._out = self._out, []
        return out


def _token_start() -> Generator[None, str, str]:
    """The next character that is not whitespace."""
    char = yield
    while char.isspace():
        char = yield
    return char


def _literal(text: str) -> _Chars:
    """``text`` exactly, after any whitespace."""
    char = yield from _token_start()
    for index, expected in enumerate(text):
        if index:
            char = yield
        if char != expected:
            raise MalformedToolCall(f"expected {text!r} in the tool call block")


def _name() -> Generator[None, str, str]:
    """A JSON string's characters up to its closing quote (function names need no
    escapes)."""
    chars: list[str] = []
    char = yield
    while char != '"':
        if char == "\\" or len(chars) >= 64:
            raise MalformedToolCall("a malformed function name")
        chars.append(char)
        char = yield
    return "".join(chars)


def _prefix_overlap(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
