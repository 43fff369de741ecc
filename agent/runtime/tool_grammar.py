"""The GBNF grammar a job's tool calls are generated under.

It admits exactly the block of core/tool_calls.py: each call names one of the
tools (FUNCTION: the chosen one) and its arguments follow that tool's JSON
Schema (llama-cpp-python's converter, as for response formats), one call or,
with parallel calls, up to MAX_PARALLEL_CALLS. Nothing may follow the block
but the end of the turn.

How the model decides (tool choice):

- REQUIRED and FUNCTION: the grammar holds from the first token, so the reply
  is the block;
- AUTO: the grammar is lazy. The model writes freely until it writes the
  block's opener ``<tool_call>``, which it was taught in the prompt
  (chat_prompt.py); from there the grammar holds. A reply that never writes
  it is plain text. With no template of its own for tools, whether a small
  model calls depends on how well it follows those instructions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from agent.runtime.base import InvalidRequest
from agent.runtime.json_grammar import with_json_strings
from agent.runtime.sampling import Grammar
from core.inference import FunctionTool, ToolChoiceMode, ToolUse
from core.request_limits import TOOLS_FIELD
from core.tool_calls import CLOSER, MAX_PARALLEL_CALLS, OPENER

_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
_BLOCK_START = OPENER + "[\n"
_BLOCK_END = "\n]" + CLOSER
_CALL_SEPARATOR = ",\n"
_NOT_IN_RULE_NAMES = re.compile(r"[^a-zA-Z0-9-]+")


class _SchemaRules(SchemaConverter):
    """llama-cpp-python's converter, with each ``$ref``'s rule named after the whole
    reference: upstream names it after the last segment, which two tools' schemas
    may share with different meanings (each tool's references carry its own base)."""

    def _resolve_ref(self, ref: str) -> str:
        name = _rule_name(f"ref-{ref}")
        if name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            resolved: str = self.visit(self._refs[ref], name)  # type: ignore[no-untyped-call]
            self._refs_being_resolved.remove(ref)
            return resolved
        return name


def tool_grammar(tool_use: ToolUse) -> Grammar:
    try:
        return _grammar(tool_use)
    except Exception as exc:  # the converter raises assorted errors on schemas it cannot do
        raise InvalidRequest(f"unsupported JSON schema in tools: {exc}", TOOLS_FIELD) from exc


def _grammar(tool_use: ToolUse) -> Grammar:
    # Untyped upstream.
    converter: Any = _SchemaRules(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    offered = [
        (index, tool)
        for index, tool in enumerate(tool_use.tools)
        if tool_use.mode is not ToolChoiceMode.FUNCTION or tool.name == tool_use.function
    ]
    calls = []
    for index, tool in offered:
        arguments = converter.visit(
            converter.resolve_refs(_arguments_schema(tool), f"tool{index}"), f"tc-args-{index}"
        )
        head = _literal(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
        calls.append(converter._add_rule(f"tc-call-{index}", f'{head} {arguments} "}}"'))
    several = tool_use.parallel_calls and tool_use.mode is not ToolChoiceMode.FUNCTION
    separator = _literal(_CALL_SEPARATOR)
    repeat = f" ( {separator} tc-call ){{0,{MAX_PARALLEL_CALLS - 1}}}" if several else ""
    rules = [
        f"root ::= {_literal(_BLOCK_START)} tc-call{repeat} {_literal(_BLOCK_END)}",
        f"tc-call ::= {' | '.join(calls)}",
        with_json_strings(converter.format_grammar()),
    ]
    lazy = tool_use.mode is ToolChoiceMode.AUTO
    return Grammar("\n".join(rules), trigger=OPENER if lazy else "", param=TOOLS_FIELD)


def _arguments_schema(tool: FunctionTool) -> dict[str, Any]:
    if not tool.parameters:
        return dict(_NO_ARGUMENTS)
    schema: dict[str, Any] = json.loads(tool.parameters)
    # Arguments are an object even where the schema leaves the type out.
    return {**schema, "type": "object"} if "type" not in schema else schema


def _literal(text: str) -> str:
    """A GBNF string literal (JSON's escapes are GBNF's)."""
    return json.dumps(text)


def _rule_name(text: str) -> str:
    return _NOT_IN_RULE_NAMES.sub("-", text)
