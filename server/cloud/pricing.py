"""Admission arithmetic: bounds on a request's tokens and what they cost.

The hold taken before a job must cover the worst case, and the node enforces
the same bounds, so the captured amount can never exceed the hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import InvalidArgument
from core.inference import CatalogModel, ChatMessage, ChatRole, FunctionTool, ModelPrice, Usage
from core.request_limits import message_bytes, tool_bytes
from core.tool_calls import MARKUP_OVERHEAD_BYTES, TOOL_PROMPT_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class TokenBudget:
    max_prompt_tokens: int
    max_completion_tokens: int


def prompt_token_bound(
    messages: tuple[ChatMessage, ...], model: CatalogModel, tools: tuple[FunctionTool, ...] = ()
) -> int:
    """An upper bound on the templated prompt's tokens.

    Byte-level BPE tokenizers never produce more tokens than UTF-8 bytes; the
    template adds at most the catalog's overhead plus a few markers per message,
    and a node renders tools, calls and their results with markup of bounded size
    (core/tool_calls.py). JSON it re-serializes (schemas, arguments) may gain a
    space after each separator, so at most doubles.
    """
    content_bytes = sum(_message_bound(m) for m in messages)
    if tools:
        content_bytes += 2 * tool_bytes(tools) + TOOL_PROMPT_OVERHEAD_BYTES
        content_bytes += MARKUP_OVERHEAD_BYTES * len(tools)
    return content_bytes + model.chat_template_overhead_tokens


def _message_bound(message: ChatMessage) -> int:
    size = message_bytes(message) + len(message.role.value) + 4
    if message.tool_calls or message.role is ChatRole.TOOL:
        size += MARKUP_OVERHEAD_BYTES
    for call in message.tool_calls:
        size += MARKUP_OVERHEAD_BYTES + len(call.arguments.encode())
    return size


# A raw prompt gets no template; the tokenizer may add a BOS token or two.
RAW_PROMPT_OVERHEAD_TOKENS = 2


def text_token_bound(prompt: str, model: CatalogModel) -> int:
    """An upper bound on a raw (untemplated) prompt's tokens."""
    return len(prompt.encode()) + RAW_PROMPT_OVERHEAD_TOKENS


def token_budget(prompt_bound: int, max_tokens: int | None, model: CatalogModel) -> TokenBudget:
    """The prompt's bound (capped below the context) and the completion's."""
    context = model.context_length
    if max_tokens is not None and not 1 <= max_tokens <= context:
        raise InvalidArgument(
            f"max_tokens must be between 1 and the model's context length ({context})",
            field="max_tokens",
        )
    prompt = min(prompt_bound, context - 1)
    return TokenBudget(max_prompt_tokens=prompt, max_completion_tokens=max_tokens or context)


def cost(price: ModelPrice, usage: Usage) -> int:
    return usage.prompt_tokens * price.prompt + usage.completion_tokens * price.completion


def worst_case_cost(price: ModelPrice, budget: TokenBudget) -> int:
    return cost(price, Usage(budget.max_prompt_tokens, budget.max_completion_tokens))
