"""The real llama.cpp runtime in its worker process: a schema that crashes llama.cpp's
grammar parser costs one generation, and a schema it cannot take is the caller's error.

The request goes to the runtime directly, past cloud's and the agent's bounds
(core/request_limits.py), as a bug in those bounds would let it through.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import pytest

from agent.backoff import Backoff
from agent.runtime.base import (
    GenerationError,
    GenerationEvent,
    GenerationRequest,
    InvalidRequest,
    TokenText,
)
from agent.runtime.loader import RuntimeSettings, load_runtime
from agent.runtime.models import DEFAULT_MODEL_ID
from agent.runtime.worker import WorkerRuntime
from core.inference import ChatMessage, ChatRole, ResponseFormat, ResponseFormatType, Sampling
from core.request_limits import SCHEMA_FIELD

pytestmark = pytest.mark.model

CRASHING_SCHEMA = '{"type":"array","items":{"type":"integer"},"maxItems":100000}'


@pytest.fixture(scope="module")
async def worker() -> AsyncIterator[WorkerRuntime]:
    runtime = await WorkerRuntime.start(
        functools.partial(load_runtime, RuntimeSettings(context_length=512)),
        backoff=Backoff(base_s=0.05, cap_s=0.2),
    )
    yield runtime
    await runtime.close()


def _request(schema: str = "") -> GenerationRequest:
    return GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, "List some numbers."),),
        sampling=Sampling(
            max_tokens=8,
            temperature=0.0,
            response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema)
            if schema
            else None,
        ),
        max_prompt_tokens=400,
    )


async def _collect(runtime: WorkerRuntime, request: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in runtime.generate(request)]


async def test_a_schema_that_crashes_llama_cpp_costs_one_generation(
    worker: WorkerRuntime,
) -> None:
    with pytest.raises(GenerationError):
        await _collect(worker, _request(CRASHING_SCHEMA))

    events = await _collect(worker, _request())
    assert any(isinstance(event, TokenText) and event.text for event in events)
    assert worker.starts == 2


@pytest.mark.parametrize(
    "schema",
    [
        # Not compilable by llama.cpp (nesting past its parser's limit).
        '{"type":"array","items":{"type":"integer"},"maxItems":2000}',
        # Not convertible (patterns must be anchored).
        '{"type":"string","pattern":"abc"}',
    ],
)
async def test_a_schema_llama_cpp_cannot_take_is_the_callers_error(
    worker: WorkerRuntime, schema: str
) -> None:
    starts = worker.starts

    with pytest.raises(InvalidRequest) as raised:
        await _collect(worker, _request(schema))

    assert raised.value.param == SCHEMA_FIELD
    assert worker.starts == starts
