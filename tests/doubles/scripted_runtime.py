"""A runtime that 'generates' a scripted text, one word per token.

Deterministic and instant (or paced with ``token_delay_s``), so tests of the
agent, network and cloud can check exact texts, token counts and billing
without a model. A token's id is its position in the script; a continuation
resumes after the delivered tokens, so an interrupted and continued job yields
exactly the text of an uninterrupted one.

``answers`` maps a prompt (the last message, or a text completion's prompt) to
the text generated for it instead of the script: give it the catalog's
canaries (``canary_answers()``) for a node that answers them correctly, or
other texts for one that does not. ``tool_answers`` does the same for jobs
that offer tools: give it the calls as a node writes them (core/tool_calls.py).
``cached`` is what it advertises as the conversations it holds (a node
routed to for their next turns).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agent.runtime.base import (
    Embedding,
    Finished,
    GenerationError,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PromptTooLong,
    Started,
    TokenText,
    UnknownModel,
)
from core.inference import FinishReason, TokenLogprob, TopLogprob, token_text
from server.network.catalog import Catalog

MODEL_ID = "smollm2-135m-instruct"
DEFAULT_SCRIPT = "one two three four five six seven eight nine ten"


def scripted_tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])]


def prompt_tokens(request: GenerationRequest) -> int:
    """One token per word of every message, plus two per message for the template;
    a text completion's prompt: one per word, plus one (BOS)."""
    if request.prompt is not None:
        return len(request.prompt.split()) + 1
    return sum(len(m.content.split()) + 2 for m in request.messages)


@dataclass
class ScriptedRuntime:
    script: str = DEFAULT_SCRIPT
    token_delay_s: float = 0.0
    model_id: str = MODEL_ID
    slot_count: int = 1
    # Raise this from generate() after that many tokens (a runtime crash).
    fail_after: int | None = None
    answers: dict[str, str] = field(default_factory=dict)
    tool_answers: dict[str, str] = field(default_factory=dict)
    # The fingerprints the node advertises as cached (core/prompt_prefixes.py).
    cached: tuple[int, ...] = ()
    started_jobs: list[GenerationRequest] = field(default_factory=list)
    cancelled_jobs: int = 0
    _slots: asyncio.Semaphore | None = None

    @property
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model_id, "scripted", 2048)]

    @property
    def slots(self) -> int:
        return self.slot_count

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.model != self.model_id:
            raise UnknownModel(request.model)
        prompt = prompt_tokens(request)
        if prompt > request.max_prompt_tokens:
            raise PromptTooLong(f"prompt has {prompt} tokens, limit {request.max_prompt_tokens}")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.slot_count)
        if request.embed:
            self.started_jobs.append(request)
            yield Started(prompt)
            yield Embedding(scripted_embedding(request.prompt or ""))
            yield Finished(FinishReason.STOP, prompt, 0)
            return
        answers = self.answers if request.tool_use is None else self.tool_answers
        tokens = scripted_tokens(answers.get(_prompt_text(request), self.script))
        start = _resume_at(request, tokens)
        async with self._slots:
            self.started_jobs.append(request)
            yield Started(prompt)
            produced = 0
            try:
                for index in range(start, min(len(tokens), start + request.sampling.max_tokens)):
                    if self.fail_after is not None and produced == self.fail_after:
                        raise ValueError("scripted runtime failure")
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    produced += 1
                    yield TokenText(tokens[index], 1, (index,), _logprobs(request, tokens[index]))
            except (asyncio.CancelledError, GeneratorExit):
                self.cancelled_jobs += 1
                raise
            reason = (
                FinishReason.LENGTH
                if produced == request.sampling.max_tokens
                else FinishReason.STOP
            )
            yield Finished(reason, prompt, produced)

    def cached_prefixes(self) -> tuple[int, ...]:
        return self.cached

    async def close(self) -> None:
        return None


def canary_answers(model: str = MODEL_ID) -> dict[str, str]:
    """The catalog's known-answer canaries of ``model``, answered as the reference does."""
    return {c.prompt: c.expected for c in Catalog(()).canaries(model)}


def _prompt_text(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    return request.messages[-1].content if request.messages else ""


def _resume_at(request: GenerationRequest, tokens: list[str]) -> int:
    """Index of the first token to generate: after a continuation's delivered ones."""
    continuation = request.continuation
    if continuation is None:
        return 0
    count = continuation.token_count
    if continuation.token_ids and continuation.token_ids != tuple(range(count)):
        raise GenerationError("continuation token ids do not match the script")
    if "".join(tokens[:count]) != continuation.text:
        raise GenerationError("continuation text does not match the script")
    return count


# The scripted token's logprob; alternatives rank below it.
SCRIPTED_LOGPROB = -0.5


def _logprobs(request: GenerationRequest, token: str) -> tuple[TokenLogprob, ...]:
    if not request.sampling.logprobs:
        return ()
    top = request.sampling.top_logprobs
    piece = token.encode()
    alternatives = (
        TopLogprob(token, piece, SCRIPTED_LOGPROB),
        *(
            TopLogprob(f"alt{rank}", f"alt{rank}".encode(), SCRIPTED_LOGPROB - rank)
            for rank in range(1, top)
        ),
    )
    return (TokenLogprob(token_text(piece), piece, SCRIPTED_LOGPROB, alternatives[:top]),)


def scripted_embedding(text: str) -> tuple[float, ...]:
    """A deterministic 3-dimensional 'embedding' of ``text``."""
    return (float(len(text.split())), 1.0, -0.5)
