"""The grammars of the JSON response formats: for `json_object`, any JSON object a
small model can finish; for `json_schema`, the converter's, with strings JSON allows.

llama-cpp-python's ``JSON_GBNF`` allows free whitespace (a newline and up to 20
tabs or spaces around every token), unbounded nesting and unbounded strings.
Under it SmolLM2 often never closes the object: it indents, opens one more
level or extends a string until ``max_tokens`` (bench/README.md, "JSON modes
that end"). This grammar allows:

- no whitespace but one optional space after ``:`` and ``,`` (the spacing models
  learned, so they keep their usual tokens);
- objects and arrays nested at most ``MAX_DEPTH`` deep (the root object counts),
  with at most ``MAX_ITEMS`` members or elements each: at the deepest level only
  strings, numbers, booleans and null;
- strings of at most ``MAX_STRING_CHARS`` characters, with JSON's escapes only
  (no raw control characters, which strict parsers refuse);
- numbers of at most 16 integer and 15 fraction digits.

So every document the grammar accepts is valid JSON, and the model is pushed
toward the end: an object it cannot nest deeper or lengthen further must close.
Repetition bounds are written as llama.cpp's ``{m,n}``, which it expands into
nested optional rules; these bounds keep the grammar at a few hundred rules.

A `json_schema` grammar is llama-cpp-python's conversion of the schema, which
already allows one space at most between tokens; its strings, though, admit raw
control characters (a newline inside a string), which no strict JSON parser
takes, so its ``char`` rule is replaced by JSON's.
"""

from __future__ import annotations

from llama_cpp.llama_grammar import PRIMITIVE_RULES, json_schema_to_gbnf

MAX_DEPTH = 3
MAX_ITEMS = 16
MAX_STRING_CHARS = 128
MAX_KEY_CHARS = 48
# A character of a JSON string: no raw control characters, JSON's escapes only.
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
# The converter's character rule, as it writes it into a schema's grammar.
_CONVERTER_CHAR = f"char ::= {PRIMITIVE_RULES['char'].content}"


def json_object_grammar(
    depth: int = MAX_DEPTH,
    items: int = MAX_ITEMS,
    string_chars: int = MAX_STRING_CHARS,
    key_chars: int = MAX_KEY_CHARS,
) -> str:
    """GBNF for a JSON object within these bounds (see the module's docstring)."""
    if min(depth, items, string_chars, key_chars) < 1:
        raise ValueError("every bound must be positive")
    more = items - 1
    rules = ["root ::= object1"]
    for level in range(1, depth + 1):
        inner = "scalar" if level == depth else f"value{level + 1}"
        rules += [
            f'object{level} ::= "{{" ( member{level} ( "," sp member{level} ){{0,{more}}} )? "}}"',
            f'member{level} ::= key ":" sp {inner}',
        ]
        if level > 1:  # the root is an object
            rules += [
                f'array{level} ::= "[" ( {inner} ( "," sp {inner} ){{0,{more}}} )? "]"',
                f"value{level} ::= object{level} | array{level} | scalar",
            ]
    rules += [
        'scalar ::= string | number | "true" | "false" | "null"',
        f'string ::= "\\"" char{{0,{string_chars}}} "\\""',
        f'key ::= "\\"" char{{0,{key_chars}}} "\\""',
        f"char ::= {_JSON_CHAR}",
        'number ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,15})? ([eE] [-+]? [0-9]{1,3})?',
        'sp ::= " "?',
    ]
    return "\n".join(rules) + "\n"


JSON_OBJECT_GBNF = json_object_grammar()


def json_schema_grammar(schema: str) -> str:
    """GBNF for JSON that validates against ``schema`` (JSON text), with JSON strings."""
    return with_json_strings(json_schema_to_gbnf(schema))


def with_json_strings(converted: str) -> str:
    """The schema converter's grammar ``converted`` with strings limited to what JSON
    allows (tool-call arguments come from the same converter)."""
    return "\n".join(
        f"char ::= {_JSON_CHAR}" if line == _CONVERTER_CHAR else line
        for line in converted.splitlines()
    )
