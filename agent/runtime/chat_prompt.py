"""A chat's messages and tools as a model's chat template takes them.

A template that knows tools (its source uses ``tools``) gets them as the
Hugging Face convention has it: the tools in OpenAI's shape, assistant
messages with ``tool_calls`` (arguments as objects), ``tool`` messages with
their ``tool_call_id``. Any other template (SmolLM2-135M's: plain ChatML,
``role`` and ``content`` only) gets plain messages in the SmolLM2 family's
tool format:

- with tools offered, a system message first that lists them in ``<tools>``
  and asks for calls as the block of core/tool_calls.py (the caller's own
  first system message follows in the same turn);
- an assistant's calls as that block, after its text;
- a tool result as a user turn ``<tool_response>...</tool_response>``.

Every caller string goes through ``caller_text`` (the node's own wording
around it, such as the tool instructions and ``<tool_response>``, goes with
it: none of it is the template's markup), so that the prompt can be tokenized
with only the template's control tokens read as such (template_markup.py).

Either way the calls themselves are generated under a grammar in that block's
format (tool_grammar.py). ``developer`` messages become ``system`` ones unless
the template names a developer role.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from core.inference import ChatMessage, ChatRole, FunctionTool, ToolChoiceMode, ToolUse
from core.tool_calls import CLOSER, OPENER, render_calls

RESPONSE_OPEN = "<tool_response>\n"
RESPONSE_CLOSE = "\n</tool_response>"


def template_inputs(
    messages: tuple[ChatMessage, ...],
    tool_use: ToolUse | None,
    template: str,
    caller_text: Callable[[str], str] = str,
) -> dict[str, Any]:
    """The keyword arguments of the template's rendering: ``messages`` and, for a
    template that knows tools, ``tools``; each string from the caller as
    ``caller_text`` maps it."""
    developer = "developer" in template
    if "tools" in template:
        native: dict[str, Any] = {
            "messages": [_native(m, developer, caller_text) for m in messages]
        }
        if tool_use is not None:
            native["tools"] = [_tool_dict(tool, caller_text) for tool in tool_use.tools]
        return native
    plain = [_plain(message, developer) for message in messages]
    if tool_use is not None:
        plain = _with_tool_instructions(plain, tool_use)
    return {"messages": [_caller_fields(message, caller_text) for message in plain]}


def tool_instructions(tool_use: ToolUse) -> str:
    """The system text that offers the tools to a model without a tools template."""
    listed = json.dumps(
        [
            {"name": t.name, "description": t.description, "parameters": _parameters(t)}
            for t in tool_use.tools
        ],
        ensure_ascii=False,
    )
    if tool_use.mode is ToolChoiceMode.FUNCTION:
        when = f"Answer with a call of {tool_use.function}, and nothing else."
    elif tool_use.mode is ToolChoiceMode.REQUIRED:
        when = "Answer with function calls, and nothing else."
    else:
        when = "Call functions when they help; otherwise answer in plain text."
    how_many = (
        "one or more calls"
        if tool_use.parallel_calls and tool_use.mode is not ToolChoiceMode.FUNCTION
        else "exactly one call"
    )
    return (
        "You can call functions. Each is described by its name, what it does and "
        "the JSON Schema of its arguments:\n"
        f"<tools>{listed}</tools>\n"
        f"{when} To call, write {how_many} in this form:\n"
        f'{OPENER}[\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n]{CLOSER}\n'
        f"Results come back in {RESPONSE_OPEN.strip()} messages."
    )


def _with_tool_instructions(
    messages: list[dict[str, Any]], tool_use: ToolUse
) -> list[dict[str, Any]]:
    instructions = tool_instructions(tool_use)
    if messages and messages[0]["role"] == ChatRole.SYSTEM.value:
        first = messages[0]
        merged = {**first, "content": f"{instructions}\n\n{first['content']}"}
        return [merged, *messages[1:]]
    return [{"role": ChatRole.SYSTEM.value, "content": instructions}, *messages]


def _role(role: ChatRole, developer: bool) -> str:
    return ChatRole.SYSTEM.value if role is ChatRole.DEVELOPER and not developer else role.value


def _plain(message: ChatMessage, developer: bool) -> dict[str, Any]:
    if message.role is ChatRole.TOOL:
        content = f"{RESPONSE_OPEN}{message.content}{RESPONSE_CLOSE}"
        rendered: dict[str, Any] = {"role": ChatRole.USER.value, "content": content}
    elif message.tool_calls:
        calls = render_calls(message.tool_calls)
        text = f"{message.content}\n{calls}" if message.content else calls
        rendered = {"role": message.role.value, "content": text}
    else:
        rendered = {"role": _role(message.role, developer), "content": message.content}
    if message.name:
        rendered["name"] = message.name
    return rendered


def _caller_fields(message: dict[str, Any], caller_text: Callable[[str], str]) -> dict[str, Any]:
    """A plain message with its content and name (the role is the node's) mapped."""
    return {key: value if key == "role" else caller_text(value) for key, value in message.items()}


def _native(
    message: ChatMessage, developer: bool, caller_text: Callable[[str], str]
) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "role": _role(message.role, developer),
        "content": caller_text(message.content),
    }
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": caller_text(call.id),
                "type": "function",
                "function": {
                    "name": caller_text(call.name),
                    "arguments": _mapped(_json_or_text(call.arguments), caller_text),
                },
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        rendered["tool_call_id"] = caller_text(message.tool_call_id)
    if message.name:
        rendered["name"] = caller_text(message.name)
    return rendered


def _tool_dict(tool: FunctionTool, caller_text: Callable[[str], str]) -> dict[str, Any]:
    function = {
        "name": caller_text(tool.name),
        "description": caller_text(tool.description),
        "parameters": _mapped(_parameters(tool), caller_text),
    }
    return {"type": "function", "function": function}


def _mapped(value: Any, caller_text: Callable[[str], str]) -> Any:
    """Parsed JSON with its every string, keys included, mapped."""
    if isinstance(value, str):
        return caller_text(value)
    if isinstance(value, dict):
        return {caller_text(k): _mapped(v, caller_text) for k, v in value.items()}
    if isinstance(value, list):
        return [_mapped(item, caller_text) for item in value]
    return value


def _parameters(tool: FunctionTool) -> Any:
    return json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
