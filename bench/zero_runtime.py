"""A runtime that generates instantly, for measuring the platform's own overhead.

Every generation yields Started, ``tokens`` one-token TokenText events (capped
at the request's max_tokens) and Finished, without awaiting anything, so the
time a request takes is the platform's, not a model's. ``slot_count`` is high
so the agent never makes jobs wait for a slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from agent.runtime.base import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    Started,
    StopReason,
    TokenText,
    UnknownModel,
)

MODEL_ID = "smollm2-135m-instruct"  # a catalog model, so the network routes it
PROMPT_TOKENS = 8


@dataclass
class ZeroRuntime:
    tokens: int = 16
    model_id: str = MODEL_ID
    slot_count: int = 1024

    @property
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_id, "zero", 2048)]

    @property
    def slots(self) -> int:
        return self.slot_count

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.model != self.model_id:
            raise UnknownModel(request.model)
        count = min(self.tokens, request.sampling.max_tokens)
        yield Started(PROMPT_TOKENS)
        for index in range(count):
            yield TokenText(" tok", 1, (index,))
        reason = StopReason.LENGTH if count == request.sampling.max_tokens else StopReason.STOP
        yield Finished(reason, PROMPT_TOKENS, count)

    async def close(self) -> None:
        return None
