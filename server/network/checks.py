"""Running the checks of validation.py on nodes: join validation and disguised canaries.

The jobs themselves run through the service's ordinary job machinery (the
``probe``): a check is assigned, fenced, given up on a lost node and its
signed result verified like any other job, so to the node it is one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from core.metrics import NO_COUNTER, Counter
from server.network.catalog import Catalog
from server.network.nodes import ModelStatus, ModelValidation, NodeSession
from server.network.settings import ValidationSettings
from server.network.validation import (
    Canary,
    benchmark_figures,
    benchmark_passes,
    canary_passes,
    next_reputation,
    should_quarantine,
)

log = structlog.get_logger(__name__)

# The join benchmark's prompt: any short instruction with a long enough answer.
BENCHMARK_PROMPT = "Count from one to thirty, separated by commas."


@dataclass(frozen=True, slots=True)
class Probe:
    """What a node returned for a validation or canary job (monotonic times)."""

    done: bool
    text: str
    tokens: int
    assigned_at: float
    first_token_at: float
    done_at: float


class ProbeRunner(Protocol):
    async def __call__(self, node: NodeSession, spec: GenerationSpec) -> Probe | None:
        """Runs ``spec`` on ``node`` as an ordinary job; None if it was given up."""
        ...


class NodeChecks:
    def __init__(
        self,
        catalog: Catalog,
        settings: ValidationSettings,
        probe: ProbeRunner,
        *,
        serve: Callable[[NodeSession, str], None],
        quarantine: Callable[[NodeSession, str], None],
        standing_changed: Callable[[NodeSession], None],
        rng: random.Random | None = None,
        canaries: Counter = NO_COUNTER,
    ) -> None:
        """``serve`` routes a model to a node that passed it; ``quarantine`` takes a
        node out of service; ``standing_changed`` records a canary's verdict;
        ``canaries`` counts verdicts by model, phase and result."""
        self._canaries = canaries
        self._catalog = catalog
        self._settings = settings
        self._probe = probe
        self._serve = serve
        self._quarantine = quarantine
        self._standing_changed = standing_changed
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    def validate(self, node: NodeSession) -> None:
        """Marks the node's models pending and validates them in the background."""
        for model in node.models:
            node.model_status[model] = ModelStatus()
        self._spawn(self._validate(node))

    def maybe_canary(self, node: NodeSession, model: str, rate: float) -> None:
        """With probability ``rate``, sends the node a disguised canary of ``model``."""
        canaries = self._catalog.canaries(model)
        if not canaries or self._rng.random() >= rate:
            return
        self._spawn(self._canary(node, self._rng.choice(canaries)))

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="node-check")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _validate(self, node: NodeSession) -> None:
        """Benchmark, then canaries, for each model."""
        bound = log.bind(node_id=node.node_id)
        for model in sorted(node.models):
            status = node.model_status[model]
            bench_spec = self._spec(model, BENCHMARK_PROMPT, self._settings.benchmark_tokens)
            bench = await self._probe(node, bench_spec)
            if bench is None:
                return  # node gone: nothing to decide
            figures = benchmark_figures(
                assigned_at=bench.assigned_at,
                first_token_at=bench.first_token_at,
                done_at=bench.done_at,
                tokens=bench.tokens,
            )
            status.time_to_first_token_ms = figures.time_to_first_token_ms
            status.tokens_per_second = figures.tokens_per_second
            failure = ""
            if not bench.done or not benchmark_passes(
                figures, bench.tokens, self._settings.min_tokens_per_second
            ):
                failure = "benchmark failed"
            for canary in self._catalog.canaries(model):
                if failure:
                    break
                answer = await self._probe(node, self._canary_spec(canary))
                if answer is None:
                    return
                passed = answer.done and canary_passes(canary.expected, answer.text)
                self._canaries.inc(model, "join", _result(passed))
                if not passed:
                    node.standing.failed_canary = True
                    self._standing_changed(node)
                    failure = "wrong answer to a known-answer canary"
            if failure:
                status.validation, status.reason = ModelValidation.FAILED, failure
                bound.warning("model failed validation", model=model, reason=failure)
            else:
                status.validation = ModelValidation.PASSED
                self._serve(node, model)
                bound.info(
                    "model validated",
                    model=model,
                    ttft_ms=round(figures.time_to_first_token_ms, 1),
                    tokens_per_second=round(figures.tokens_per_second, 1),
                )
        if not any(s.serving for s in node.model_status.values()):
            self._quarantine(node, "failed validation for every model it offers")

    async def _canary(self, node: NodeSession, canary: Canary) -> None:
        answer = await self._probe(node, self._canary_spec(canary))
        if answer is None:
            return  # no verdict: the node was lost (or cut off) on the way
        passed = answer.done and canary_passes(canary.expected, answer.text)
        self._canaries.inc(canary.model, "service", _result(passed))
        node.standing.failed_canary = node.standing.failed_canary or not passed
        node.standing.reputation = next_reputation(
            node.standing.reputation, passed, self._settings.reputation_alpha
        )
        self._standing_changed(node)
        log.info(
            "canary checked",
            node_id=node.node_id,
            passed=passed,
            reputation=node.standing.reputation,
        )
        if should_quarantine(node.standing.reputation, self._settings.quarantine_below):
            self._quarantine(
                node, f"reputation {node.standing.reputation:.2f} after failed canaries"
            )

    def _spec(self, model: str, prompt: str, max_tokens: int) -> GenerationSpec:
        context = self._catalog.get(model).context_length
        return GenerationSpec(
            model=model,
            messages=(ChatMessage(ChatRole.USER, prompt),),
            sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
            max_prompt_tokens=context - max_tokens,
        )

    def _canary_spec(self, canary: Canary) -> GenerationSpec:
        return self._spec(canary.model, canary.prompt, canary.max_tokens)


def _result(passed: bool) -> str:
    return "passed" if passed else "failed"
