"""The JSON grammars with the real SmolLM2: they compile in llama.cpp, and a reply in
json_object mode stays within the grammar's bounds and ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import pytest

from agent.runtime.base import Finished, GenerationRequest, TokenText
from agent.runtime.json_grammar import (
    JSON_OBJECT_GBNF,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_STRING_CHARS,
    json_schema_grammar,
)
from agent.runtime.llama_cpp import LlamaCppRuntime
from agent.runtime.models import DEFAULT_MODEL_ID, smollm2_gguf_path
from core.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
)

pytestmark = pytest.mark.model

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "tags": {"type": "array"}, "extra": {}},
}


@pytest.mark.parametrize("grammar", [JSON_OBJECT_GBNF, json_schema_grammar(json.dumps(SCHEMA))])
def test_the_grammars_compile(grammar: str) -> None:
    vocab_only = llama_cpp.Llama(str(smollm2_gguf_path()), vocab_only=True, verbose=False)
    try:
        vocab = llama_lib.llama_model_get_vocab(vocab_only.model)
        compiled = llama_lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        assert compiled
        llama_lib.llama_sampler_free(compiled)
    finally:
        vocab_only.close()


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0


def _containers(value: object) -> list[dict[str, object] | list[object]]:
    if isinstance(value, dict):
        return [value, *(c for item in value.values() for c in _containers(item))]
    if isinstance(value, list):
        return [value, *(c for item in value for c in _containers(item))]
    return []


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [*value, *(s for item in value.values() for s in _strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.fixture(scope="module")
async def runtime() -> AsyncIterator[LlamaCppRuntime]:
    loaded = await LlamaCppRuntime.load(DEFAULT_MODEL_ID, smollm2_gguf_path(), context_length=512)
    yield loaded
    await loaded.close()


async def test_a_json_object_asked_to_nest_deeply_stays_within_bounds_and_ends(
    runtime: LlamaCppRuntime,
) -> None:
    request = GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=(
            ChatMessage(
                ChatRole.USER, "Write a JSON object nested ten levels deep, with long strings."
            ),
        ),
        sampling=Sampling(
            max_tokens=300,
            temperature=0.0,
            response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT),
        ),
        max_prompt_tokens=200,
    )
    events = [event async for event in runtime.generate(request)]
    text = "".join(event.text for event in events if isinstance(event, TokenText))
    [finished] = [event for event in events if isinstance(event, Finished)]

    assert finished.reason is FinishReason.STOP, text
    value = json.loads(text)
    assert isinstance(value, dict)
    assert _depth(value) <= MAX_DEPTH
    assert all(len(container) <= MAX_ITEMS for container in _containers(value))
    assert all(len(string) <= MAX_STRING_CHARS for string in _strings(value))
    # No whitespace but the one space allowed after ":" and ",".
    assert "\n" not in text
    assert "  " not in text
