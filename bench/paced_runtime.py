"""A runtime that generates at a fixed pace, for measuring the platform itself.

Token ``i`` of a reply is the text `` t<i>`` and comes ``interval_s`` after the
previous one; with ``interval_s`` 0 it generates instantly, so a request's
time is the platform's, not a model's. ``tokens`` caps a reply below the
request's max_tokens. A continuation (the job moved from another node) starts
at token ``continuation.token_count``, so the concatenated reply is the same
whichever nodes produced its parts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.runtime.base import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    Started,
    TokenText,
    UnknownModel,
)
from core.inference import FinishReason

MODEL_ID = "smollm2-135m-instruct"  # a catalog model, so the network routes it
PROMPT_TOKENS = 8


def token_text(index: int) -> str:
    return f" t{index}"


@dataclass
class PacedRuntime:
    interval_s: float = 0.005
    tokens: int | None = None
    model_id: str = MODEL_ID
    slot_count: int = 16

    @property
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_id, "paced", 2048)]

    @property
    def slots(self) -> int:
        return self.slot_count

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.model != self.model_id:
            raise UnknownModel(request.model)
        first = 0 if request.continuation is None else request.continuation.token_count
        budget = request.sampling.max_tokens  # what remains of it, for a continuation
        count = budget if self.tokens is None else min(self.tokens, budget)
        yield Started(PROMPT_TOKENS)
        for index in range(first, first + count):
            if self.interval_s:
                await asyncio.sleep(self.interval_s)
            yield TokenText(token_text(index), 1, (index,))
        reason = FinishReason.LENGTH if count == budget else FinishReason.STOP
        yield Finished(reason, PROMPT_TOKENS, count)

    async def close(self) -> None:
        return None
