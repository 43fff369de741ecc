from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidArgument
from core.inference import ChatMessage, ChatRole, ModelPrice, Usage
from server.cloud.pricing import (
    RAW_PROMPT_OVERHEAD_TOKENS,
    cost,
    prompt_token_bound,
    text_token_bound,
    token_budget,
    worst_case_cost,
)
from server.network.catalog import SMOLLM2_135M

MODEL = SMOLLM2_135M


def _messages(*contents: str) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(ChatRole.USER, content) for content in contents)


def test_cost_is_tokens_times_price() -> None:
    assert cost(ModelPrice(prompt=3, completion=5), Usage(10, 7)) == 65


def test_prompt_bound_counts_bytes_not_characters() -> None:
    ascii_bound = prompt_token_bound(_messages("aaaa"), MODEL)
    # Four 3-byte characters may tokenize to up to 12 byte tokens.
    assert prompt_token_bound(_messages("€€€€"), MODEL) == ascii_bound + 8


def test_raw_prompt_bound_counts_bytes_plus_bos() -> None:
    assert text_token_bound("€a", MODEL) == 4 + RAW_PROMPT_OVERHEAD_TOKENS


def test_budget_defaults_completion_to_the_context() -> None:
    budget = token_budget(prompt_token_bound(_messages("hi"), MODEL), None, MODEL)
    assert budget.max_completion_tokens == MODEL.context_length
    assert budget.max_prompt_tokens == prompt_token_bound(_messages("hi"), MODEL)


def test_prompt_bound_is_capped_below_the_context() -> None:
    budget = token_budget(prompt_token_bound(_messages("x" * 10_000), MODEL), 1, MODEL)
    assert budget.max_prompt_tokens == MODEL.context_length - 1


@pytest.mark.parametrize("max_tokens", [0, -1, MODEL.context_length + 1])
def test_out_of_range_max_tokens_is_rejected(max_tokens: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        token_budget(prompt_token_bound(_messages("hi"), MODEL), max_tokens, MODEL)
    assert raised.value.metadata == {"field": "max_tokens"}


@given(
    prompt=st.integers(0, MODEL.context_length),
    completion=st.integers(0, MODEL.context_length),
    max_tokens=st.integers(1, MODEL.context_length),
    text=st.text(max_size=200),
)
def test_any_usage_within_the_budget_costs_at_most_the_hold(
    prompt: int, completion: int, max_tokens: int, text: str
) -> None:
    budget = token_budget(prompt_token_bound(_messages(text), MODEL), max_tokens, MODEL)
    usage = Usage(min(prompt, budget.max_prompt_tokens), min(completion, max_tokens))
    assert cost(MODEL.price, usage) <= worst_case_cost(MODEL.price, budget)
