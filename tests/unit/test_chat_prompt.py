"""How the node puts tools, calls, results and every role into a chat template,
and the grammar the calls are generated under."""

from __future__ import annotations

import json

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.runtime.base import InvalidRequest
from agent.runtime.chat_prompt import template_inputs, tool_instructions
from agent.runtime.tool_grammar import tool_grammar
from core.inference import ChatMessage, ChatRole, FunctionTool, ToolCall, ToolChoiceMode, ToolUse
from core.tool_calls import TOOL_PROMPT_OVERHEAD_BYTES

# SmolLM2-135M-Instruct's template: ChatML, role and content only.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A template that knows tools, in the Hugging Face convention.
NATIVE = (
    "{% if tools %}TOOLS {{ tools | tojson }}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.id }} {{ c.function.name }}"
    " {{ c.function.arguments | tojson }}{% endfor %}"
    "{% if m.tool_call_id %} ANSWERS {{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}"
)
WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
)
CONVERSATION = (
    ChatMessage(ChatRole.SYSTEM, "Be brief."),
    ChatMessage(ChatRole.DEVELOPER, "Prefer tools."),
    ChatMessage(ChatRole.USER, "Weather in Rome?"),
    ChatMessage(
        ChatRole.ASSISTANT, "Checking.", (ToolCall("c1", "get_weather", '{"city":"Rome"}'),)
    ),
    ChatMessage(ChatRole.TOOL, "sunny", tool_call_id="c1"),
)


def _render(template: str, messages: tuple[ChatMessage, ...], tool_use: ToolUse | None) -> str:
    formatter = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
    return formatter(**template_inputs(messages, tool_use, template)).prompt


def test_a_template_without_tools_gets_them_in_the_smollm2_format() -> None:
    prompt = _render(CHATML, CONVERSATION, ToolUse((WEATHER,)))

    instructions = tool_instructions(ToolUse((WEATHER,)))
    assert prompt == (
        f"<|im_start|>system\n{instructions}\n\nBe brief.<|im_end|>\n"
        "<|im_start|>system\nPrefer tools.<|im_end|>\n"
        "<|im_start|>user\nWeather in Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n]</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert '<tools>[{"name": "get_weather"' in instructions


def test_without_tools_offered_the_history_still_shows_calls_and_results() -> None:
    prompt = _render(CHATML, CONVERSATION[2:], None)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n")
    assert "<tool_call>[" in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_a_template_that_knows_tools_renders_them_itself() -> None:
    prompt = _render(NATIVE, CONVERSATION, ToolUse((WEATHER,)))

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": json.loads(WEATHER.parameters),
            },
        }
    ]
    assert prompt == (
        f"TOOLS {json.dumps(tools)}\n"
        "system: Be brief.\n"
        "system: Prefer tools.\n"
        "user: Weather in Rome?\n"
        'assistant: Checking. CALL c1 get_weather {"city": "Rome"}\n'
        "tool: sunny ANSWERS c1\n"
    )


def test_a_template_with_a_developer_role_keeps_it() -> None:
    template = "{% for m in messages %}{{ m.role }}{% endfor %}{# developer #}"
    assert _render(template, CONVERSATION[:2], None) == "systemdeveloper"


@pytest.mark.parametrize(
    ("tool_use", "asks"),
    [
        (ToolUse((WEATHER,)), "otherwise answer in plain text"),
        (ToolUse((WEATHER,), ToolChoiceMode.REQUIRED), "one or more calls"),
        (ToolUse((WEATHER,), ToolChoiceMode.REQUIRED, parallel_calls=False), "exactly one call"),
        (ToolUse((WEATHER,), ToolChoiceMode.FUNCTION, "get_weather"), "call of get_weather"),
    ],
)
def test_the_instructions_follow_the_tool_choice(tool_use: ToolUse, asks: str) -> None:
    instructions = tool_instructions(tool_use)
    assert asks in instructions
    # Cloud's token bound allows this much beside the tools' own definitions.
    definitions = len(json.dumps([{"name": "", "description": "", "parameters": {}}]))
    assert len(instructions.encode()) - len(WEATHER.parameters) - definitions < (
        TOOL_PROMPT_OVERHEAD_BYTES
    )


def test_the_grammar_admits_the_tools_and_the_tool_choice() -> None:
    time = FunctionTool("get_time")
    parallel = tool_grammar(ToolUse((WEATHER, time)))
    single = tool_grammar(ToolUse((WEATHER, time), ToolChoiceMode.REQUIRED, parallel_calls=False))
    named = tool_grammar(ToolUse((WEATHER, time), ToolChoiceMode.FUNCTION, "get_time"))

    assert parallel.trigger == "<tool_call>"
    assert (single.trigger, named.trigger) == ("", "")
    assert '( ",\\n" tc-call ){0,7}' in parallel.text
    assert "{0,7}" not in single.text
    assert "tc-call ::= tc-call-0 | tc-call-1" in single.text
    assert "tc-call ::= tc-call-1" in named.text
    assert '"\\"get_weather\\""' not in named.text


def test_references_of_two_tools_stay_apart() -> None:
    def tool(name: str, kind: str) -> FunctionTool:
        item = {"type": "object", "properties": {"v": {"type": kind}}, "required": ["v"]}
        schema = {
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/Item"}},
            "$defs": {"Item": item},
        }
        return FunctionTool(name, parameters=json.dumps(schema))

    grammar = tool_grammar(ToolUse((tool("a", "integer"), tool("b", "boolean"))))

    rules = dict(line.split(" ::= ", 1) for line in grammar.text.splitlines())
    # Both schemas call their definition "Item": each tool's x refers to its own.
    first, second = rules["tc-args-0-x"], rules["tc-args-1-x"]
    assert first != second
    assert rules[f"{first}-v-kv"].endswith(" integer")
    assert rules[f"{second}-v-kv"].endswith(" boolean")


def test_a_schema_the_converter_cannot_do_is_the_callers_to_fix() -> None:
    broken = FunctionTool("f", parameters=json.dumps({"properties": {"x": {"$ref": "#/nope"}}}))
    with pytest.raises(InvalidRequest) as raised:
        tool_grammar(ToolUse((broken,)))
    assert raised.value.param == "tools"
