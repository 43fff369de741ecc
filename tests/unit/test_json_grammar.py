"""The JSON grammars' text: json_object's bounds, and the strings of json_schema and
of tool-call arguments."""

from __future__ import annotations

import json

import pytest

from agent.runtime.json_grammar import json_object_grammar, json_schema_grammar
from agent.runtime.tool_grammar import tool_grammar
from core.inference import FunctionTool, ToolChoiceMode, ToolUse


def test_the_deepest_level_holds_only_scalars() -> None:
    grammar = json_object_grammar(depth=2, items=3, string_chars=5, key_chars=4)
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())

    assert rules["root"] == "object1"
    assert rules["member1"] == 'key ":" sp value2'
    assert rules["value2"] == "object2 | array2 | scalar"
    assert rules["member2"] == 'key ":" sp scalar'
    assert rules["array2"] == '"[" ( scalar ( "," sp scalar ){0,2} )? "]"'
    assert "object3" not in rules
    assert rules["string"] == '"\\"" char{0,5} "\\""'
    assert rules["key"] == '"\\"" char{0,4} "\\""'
    assert rules["sp"] == '" "?'


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        json_object_grammar(depth=0)


def test_a_schemas_strings_exclude_raw_control_characters() -> None:
    schema = {"type": "object", "properties": {"note": {"type": "string"}}}
    rules = dict(
        line.split(" ::= ", 1) for line in json_schema_grammar(json.dumps(schema)).splitlines()
    )

    assert rules["char"].startswith('[^"\\\\\\x7F\\x00-\\x1F]')
    assert rules["string"] == '"\\"" char* "\\"" space'


def test_tool_arguments_strings_exclude_raw_control_characters() -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = FunctionTool("weather", parameters=json.dumps(parameters))
    grammar = tool_grammar(ToolUse((tool,), ToolChoiceMode.REQUIRED)).text
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines() if " ::= " in line)

    assert rules["char"].startswith('[^"\\\\\\x7F\\x00-\\x1F]')
