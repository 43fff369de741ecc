"""Bounds on the work a request may cause before a node looks at it.

Cloud checks them at admission (a 400 naming the field) and the agent checks
them again before templating or compiling anything, so a hostile request is
refused for the price of a scan of its own bytes:

- a JSON schema becomes a llama.cpp grammar, and the converter writes
  ``maxItems``/``maxLength`` and pattern quantifiers ``{m,n}`` out as nested
  optional groups: at 1,024 the grammar no longer compiles, at 100,000
  llama.cpp's recursive grammar parser overflows the stack and kills the
  process. Sizes, depth, counts and repetition bounds are capped here well
  below where compilation fails, and only local ``$ref`` s are allowed (the
  converter would otherwise try to fetch remote ones);
- a chat is templated and tokenized as a whole: 100,000 empty messages fit in
  a 4 MiB body and cost a node most of a minute before their length is known.
  Every message costs at least one token once templated, so more messages than
  the prompt's token bound can never fit; a byte cap bounds the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidArgument
from core.inference import (
    ChatMessage,
    FunctionTool,
    ResponseFormatType,
    Sampling,
    ToolChoiceMode,
    ToolUse,
)

SCHEMA_FIELD = "response_format.json_schema.schema"
MESSAGES_FIELD = "messages"
TOOLS_FIELD = "tools"
TOOL_CHOICE_FIELD = "tool_choice"
# OpenAI's bounds on a request's tools and their names.
MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LOGIT_BIAS_FIELD = "logit_bias"
# OpenAI's bounds: each bias in [-100, 100]; at most 300 biased tokens (a node adds
# every bias to the logits of each generated token).
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGIT_BIAS = 100.0

# A quantifier of a regular expression: {m}, {m,} or {m,n}.
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")
# Keywords whose value becomes that many repetitions in the grammar.
_REPETITION_KEYWORDS = (
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    max_bytes: int = 16 * 1024
    # Nesting of JSON objects and arrays in the schema document.
    max_depth: int = 16
    # Properties over all "properties" objects of the schema.
    max_properties: int = 256
    # Values over all "enum" lists (and "const" values).
    max_enum_values: int = 256
    max_refs: int = 64
    # Any minItems/maxItems/minLength/maxLength/... and pattern quantifier bound.
    max_repetitions: int = 256
    max_pattern_length: int = 512
    # The parameters of all of a request's tools together: one grammar is built from
    # them (at this size it compiles in about a second on a loaded 2-core machine).
    max_tools_bytes: int = 32 * 1024


@dataclass(frozen=True, slots=True)
class PromptLimits:
    max_messages: int = 2048
    # UTF-8 bytes of all message contents (or of a raw prompt).
    max_bytes: int = 1024 * 1024


SCHEMA_LIMITS = SchemaLimits()
PROMPT_LIMITS = PromptLimits()


class _SchemaError:
    """Builds the error of one schema, named after its field."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.label = "response_format json_schema" if field == SCHEMA_FIELD else field

    def __call__(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"{self.label}: {message}", field=self.field)


def parse_json_schema(
    text: str, limits: SchemaLimits = SCHEMA_LIMITS, *, field: str = SCHEMA_FIELD
) -> dict[str, Any]:
    """The schema as a JSON object, if it is within ``limits``; else InvalidArgument
    naming ``field``."""
    error = _SchemaError(field)
    size = len(text.encode())
    if size > limits.max_bytes:
        raise error(f"{size} bytes, at most {limits.max_bytes} allowed")
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):
        schema = None
    if not isinstance(schema, dict):
        raise error("must be a JSON object")
    _check_schema(schema, limits, error)
    return schema


def _check_schema(schema: dict[str, Any], limits: SchemaLimits, error: _SchemaError) -> None:
    """One iterative walk over the document (no recursion on hostile depth)."""
    properties = enum_values = refs = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise error(f"nested deeper than {limits.max_depth} levels")
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        for key in _REPETITION_KEYWORDS:
            _check_repetition(key, node.get(key), limits, error)
        if isinstance(node.get("properties"), dict):
            properties += len(node["properties"])
        if isinstance(node.get("enum"), list):
            enum_values += len(node["enum"])
        if "const" in node:
            enum_values += 1
        ref = node.get("$ref")
        if ref is not None:
            refs += 1
            if not isinstance(ref, str) or not ref.startswith("#/"):
                raise error("only local $ref values (starting with '#/') are allowed")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            _check_pattern(pattern, limits, error)
        stack.extend((value, depth + 1) for value in node.values())
    for count, limit, what in (
        (properties, limits.max_properties, "properties"),
        (enum_values, limits.max_enum_values, "enum and const values"),
        (refs, limits.max_refs, "$ref values"),
    ):
        if count > limit:
            raise error(f"{count} {what}, at most {limit} allowed")


def _check_repetition(key: str, value: object, limits: SchemaLimits, error: _SchemaError) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{key} must be a non-negative integer")
    if value > limits.max_repetitions:
        raise error(f"{key} is {value}, at most {limits.max_repetitions} allowed")


def _check_pattern(pattern: str, limits: SchemaLimits, error: _SchemaError) -> None:
    if len(pattern) > limits.max_pattern_length:
        raise error(
            f"pattern has {len(pattern)} characters, at most {limits.max_pattern_length} allowed"
        )
    for match in _QUANTIFIER.finditer(pattern):
        for bound in match.groups():
            if bound and int(bound) > limits.max_repetitions:
                raise error(
                    f"pattern repeats {bound} times, at most {limits.max_repetitions} allowed"
                )


def check_messages(
    messages: Sequence[ChatMessage],
    max_prompt_tokens: int | None = None,
    limits: PromptLimits = PROMPT_LIMITS,
    *,
    tools: Sequence[FunctionTool] = (),
) -> None:
    """Refuses a chat over ``limits`` or one that cannot fit ``max_prompt_tokens``
    (when known), without templating it: each message takes at least one token.
    The tools' definitions count towards the bytes."""
    count = len(messages)
    if count > limits.max_messages:
        raise InvalidArgument(
            f"{count} messages, at most {limits.max_messages} allowed", field=MESSAGES_FIELD
        )
    if max_prompt_tokens is not None and count > max_prompt_tokens:
        raise InvalidArgument(
            f"{count} messages cannot fit a prompt of at most {max_prompt_tokens} tokens",
            field=MESSAGES_FIELD,
        )
    size = sum(message_bytes(message) for message in messages) + tool_bytes(tools)
    check_prompt_bytes(size, MESSAGES_FIELD, limits)


def message_bytes(message: ChatMessage) -> int:
    """UTF-8 bytes of what a message gives the template: its text and its calls."""
    size = len(message.content.encode()) + len(message.name.encode())
    size += len(message.tool_call_id.encode())
    for call in message.tool_calls:
        size += len(call.id.encode()) + len(call.name.encode()) + len(call.arguments.encode())
    return size


def tool_bytes(tools: Sequence[FunctionTool]) -> int:
    """UTF-8 bytes of the tools' definitions."""
    return sum(
        len(tool.name.encode()) + len(tool.description.encode()) + len(tool.parameters.encode())
        for tool in tools
    )


def check_tool_use(tool_use: ToolUse, limits: SchemaLimits = SCHEMA_LIMITS) -> None:
    """Refuses tools a grammar cannot be built from: too many or too large together,
    names that are not identifiers or repeat, parameters that are no bounded object
    schema, and a tool choice naming no tool."""
    tools = tool_use.tools
    if not tools:
        raise InvalidArgument("tools must contain at least one tool", field=TOOLS_FIELD)
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"{len(tools)} tools, at most {MAX_TOOLS} allowed", field=TOOLS_FIELD)
    schemas = sum(len(tool.parameters.encode()) for tool in tools)
    if schemas > limits.max_tools_bytes:
        raise InvalidArgument(
            f"the tools' parameters have {schemas} bytes together, "
            f"at most {limits.max_tools_bytes} allowed",
            field=TOOLS_FIELD,
        )
    names: set[str] = set()
    for index, tool in enumerate(tools):
        field = f"{TOOLS_FIELD}.{index}.function"
        if not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(
                "a function name is 1-64 letters, digits, '_' or '-'", field=f"{field}.name"
            )
        if tool.name in names:
            raise InvalidArgument(
                f"the function name {tool.name!r} is used twice", field=f"{field}.name"
            )
        names.add(tool.name)
        if tool.parameters:
            field = f"{field}.parameters"
            schema = parse_json_schema(tool.parameters, limits, field=field)
            if schema.get("type", "object") != "object":
                raise InvalidArgument(f"{field}: must be an object schema", field=field)
    if tool_use.mode is ToolChoiceMode.FUNCTION and tool_use.function not in names:
        raise InvalidArgument(
            f"tool_choice names the function {tool_use.function!r}, which is not one of the tools",
            field=TOOL_CHOICE_FIELD,
        )


def check_prompt_bytes(size: int, field: str, limits: PromptLimits = PROMPT_LIMITS) -> None:
    if size > limits.max_bytes:
        raise InvalidArgument(
            f"the prompt has {size} bytes, at most {limits.max_bytes} allowed", field=field
        )


def check_tool_sampling(sampling: Sampling) -> None:
    """What a job that offers tools cannot also ask: a stop sequence could cut a
    call short, a response format would compete with the calls' grammar, and
    logprobs would describe the calls' markup rather than what the caller gets."""
    if sampling.stop:
        raise InvalidArgument("stop cannot be combined with tools", field="stop")
    if sampling.logprobs:
        raise InvalidArgument("logprobs cannot be combined with tools", field="logprobs")
    response_format = sampling.response_format
    if response_format is not None and response_format.type is not ResponseFormatType.TEXT:
        raise InvalidArgument(
            "a response_format other than text cannot be combined with tools",
            field="response_format",
        )


def check_logit_bias(logit_bias: Sequence[tuple[int, float]]) -> None:
    """Token ids non-negative, biases within OpenAI's range, at most 300 of them (a
    node checks the ids against its vocabulary)."""
    if len(logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidArgument(
            f"logit_bias has {len(logit_bias)} tokens, at most {MAX_LOGIT_BIAS_TOKENS} allowed",
            field=LOGIT_BIAS_FIELD,
        )
    for token, bias in logit_bias:
        if token < 0:
            raise InvalidArgument(
                f"logit_bias token ids are non-negative, not {token}", field=LOGIT_BIAS_FIELD
            )
        # NaN fails both comparisons.
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidArgument(
                f"logit_bias values are between -100 and 100, not {bias} (token {token})",
                field=LOGIT_BIAS_FIELD,
            )
