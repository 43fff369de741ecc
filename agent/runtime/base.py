"""The interface every runtime backend implements.

The agent speaks only to this interface, so a backend (llama.cpp, TensorRT-LLM,
a scripted double in tests) can be swapped without touching the agent. Types
are plain dataclasses, the request's parts those of core/inference.py:
backends never see protobuf or gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from core.inference import Continuation, FinishReason, GenerationSpec, TokenLogprob

# The longest a generation the runtime's scheduler holds back goes between two
# Waiting reports, and the interval where the network does not say its stall
# timeout (agent/assignments.py): well within its default (60 s).
WAITING_REPORT_S = 5.0


@dataclass(frozen=True, slots=True)
class GenerationRequest(GenerationSpec):
    """The job's spec, and where to pick it up when another node started it.

    For a continuation, ``sampling.max_tokens`` is what remains of the budget (may
    be 0). The runtime refuses (PromptTooLong) a templated prompt longer than
    ``max_prompt_tokens``; a text completion's ``prompt`` is used as it is (no chat
    template, no messages); ``embed`` asks for Started, one Embedding, Finished.
    A generation held back by the runtime's scheduler is told it waits when it
    starts waiting and then every ``waiting_report_s`` (within the network's stall
    timeout: agent/assignments.py).
    """

    continuation: Continuation | None = None
    waiting_report_s: float = WAITING_REPORT_S


@dataclass(frozen=True)
class Started:
    """First event of a generation: the prompt was accepted and tokenized."""

    prompt_tokens: int


@dataclass(frozen=True)
class TokenText:
    """Text of one or more newly generated tokens, ready to show."""

    text: str
    token_count: int
    # Vocabulary ids of the token_count tokens, if the backend has them.
    token_ids: tuple[int, ...] = ()
    # One per token when the request asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """Last event of a generation; a continuation counts only its new tokens."""

    reason: FinishReason  # STOP or LENGTH
    prompt_tokens: int
    completion_tokens: int
    # Of prompt_tokens, those the runtime took from its cache (a conversation's
    # start it held) instead of evaluating them. What the cache saved is not what
    # the generation produced: two ends differing only in it are equal.
    cached_prompt_tokens: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Embedding:
    """An embedding job's result: the prompt's mean-pooled, unit-length vector."""

    values: tuple[float, ...]


@dataclass(frozen=True)
class Waiting:
    """The generation waits on the runtime's scheduler, which works (preempted for
    K/V cache cells, or waiting for them) and will resume it. Sent when it starts
    waiting and again every ``GenerationRequest.waiting_report_s`` while it waits,
    by the scheduler itself: a hung runtime sends none."""


GenerationEvent = Started | Waiting | TokenText | Embedding | Finished


@dataclass(frozen=True)
class ModelInfo:
    model: str
    runtime: str
    context_length: int
    extra: dict[str, str] = field(default_factory=dict)


class GenerationError(Exception):
    """Base of the failures a backend reports for one request."""


class PromptTooLong(GenerationError):
    pass


class InvalidRequest(GenerationError):
    """The request cannot be run as given (the caller's fault, not the node's);
    ``param`` names the request field at fault, as the API names it."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(GenerationError):
    pass


class Runtime(Protocol):
    """A loaded inference backend.

    ``generate`` yields one Started, then TokenText events, and ends with
    exactly one Finished.
    Cancelling the consuming task stops generation promptly (within a token)
    and frees the slot. A backend runs at most ``slots`` generations at once;
    callers beyond that wait for a free slot.
    """

    @property
    def models(self) -> list[ModelInfo]: ...

    @property
    def slots(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    def cached_prefixes(self) -> tuple[int, ...]:
        """Fingerprints (core/prompt_prefixes.py) of the conversations whose tokens
        the backend holds for reuse, newest first, at most MAX_ADVERTISED_PREFIXES:
        the node advertises them so that a conversation's next turn is routed here."""
        ...

    async def close(self) -> None: ...
