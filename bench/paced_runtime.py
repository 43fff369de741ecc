"""A runtime that generates at a fixed pace, for measuring the platform itself.

Token ``i`` of a reply is the text `` t<i>`` and comes ``interval_s`` after the
previous one; with ``interval_s`` 0 it generates instantly, so a request's
time is the platform's, not a model's. ``tokens`` caps a reply below the
request's max_tokens. A continuation (the job moved from another node) starts
at token ``continuation.token_count``, so the concatenated reply is the same
whichever nodes produced its parts. ``answers`` maps a prompt (the last message)
to the text generated for it instead, a word per token: give it a validating
network's known-answer canaries (``canary_answers()``) and the node is admitted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

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
from server.network.catalog import Catalog

MODEL_ID = "smollm2-135m-instruct"  # a catalog model, so the network routes it
PROMPT_TOKENS = 8


def token_text(index: int) -> str:
    return f" t{index}"


def canary_answers(model: str = MODEL_ID) -> dict[str, str]:
    """The catalog's known-answer canaries of ``model``, answered as the reference does."""
    return {canary.prompt: canary.expected for canary in Catalog(()).canaries(model)}


@dataclass
class PacedRuntime:
    interval_s: float = 0.005
    tokens: int | None = None
    model_id: str = MODEL_ID
    slot_count: int = 16
    answers: Mapping[str, str] = field(default_factory=dict)

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
        prompt = request.messages[-1].content if request.messages else request.prompt
        answer = self.answers.get(prompt or "")
        if answer is not None:
            async for event in _answer(answer, first, budget):
                yield event
            return
        count = budget if self.tokens is None else min(self.tokens, budget)
        yield Started(PROMPT_TOKENS)
        for index in range(first, first + count):
            if self.interval_s:
                await asyncio.sleep(self.interval_s)
            yield TokenText(token_text(index), 1, (index,))
        reason = FinishReason.LENGTH if count == budget else FinishReason.STOP
        yield Finished(reason, PROMPT_TOKENS, count)

    def cached_prefixes(self) -> tuple[int, ...]:
        return ()

    async def close(self) -> None:
        return None


async def _answer(text: str, first: int, budget: int) -> AsyncIterator[GenerationEvent]:
    words = text.split(" ")
    pieces = [words[0], *(" " + word for word in words[1:])][first : first + budget]
    yield Started(PROMPT_TOKENS)
    for index, piece in enumerate(pieces, start=first):
        yield TokenText(piece, 1, (index,))
    reason = FinishReason.LENGTH if len(pieces) == budget else FinishReason.STOP
    yield Finished(reason, PROMPT_TOKENS, len(pieces))
