"""What the agent measures of its jobs and its model, and each job's span.

``JobTelemetry`` sits between the runner and the session's result sink: it
passes every report on unchanged and notes, per job, when it was assigned,
took a slot, sent its first and last tokens, and how it ended. From that come
the agent's metrics (jobs by outcome, tokens, time to first token, decode
speed) and, when tracing is on, the job's span: a child of the network's
dispatch span whose context came with the assignment, with GenAI attributes.

Labels are the models this agent serves and fixed sets; never job ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.runner import JobRef, JobSink
from core import tracing
from core.agent_messages import AssignCommand, ChunkReport, FailureKind
from core.inference import FinishReason
from core.metrics import (
    LATENCY_BUCKETS,
    NO_METRICS,
    SPEED_BUCKETS,
    LabelValues,
    MetricsFactory,
)


class AgentMetrics:
    def __init__(self, metrics: MetricsFactory = NO_METRICS) -> None:
        self._factory = metrics
        self.jobs = metrics.counter(
            "resultity_agent_jobs_total",
            "Jobs this agent ran, by model and outcome (done, failed, cancelled).",
            ("model", "outcome"),
        )
        self.prompt_tokens = metrics.counter(
            "resultity_agent_prompt_tokens_total", "Prompt tokens processed, by model.", ("model",)
        )
        self.prompt_cache_tokens = metrics.counter(
            "resultity_agent_prompt_cache_tokens_total",
            "Prompt tokens of finished jobs by model and result: reused (taken from the "
            "runtime's cache, a conversation's start it held) or evaluated.",
            ("model", "result"),
        )
        self.generated_tokens = metrics.counter(
            "resultity_agent_generated_tokens_total",
            "Tokens generated and sent, by model (its rate is the agent's tokens/s).",
            ("model",),
        )
        self.queue_wait = metrics.histogram(
            "resultity_agent_queue_wait_seconds",
            "Time a job waited for a free slot after its assignment.",
            ("model",),
            LATENCY_BUCKETS,
        )
        self.time_to_first_token = metrics.histogram(
            "resultity_agent_time_to_first_token_seconds",
            "Time from a job taking a slot to its first token (prompt processing).",
            ("model",),
            LATENCY_BUCKETS,
        )
        self.decode_speed = metrics.histogram(
            "resultity_agent_decode_tokens_per_second",
            "Tokens per second of each job after its first token.",
            ("model",),
            SPEED_BUCKETS,
        )
        self._load_seconds: dict[str, float] = {}
        metrics.gauge(
            "resultity_agent_model_load_seconds",
            "Seconds the agent took to load each model it serves (at start).",
            ("model",),
            lambda: [((model,), seconds) for model, seconds in self._load_seconds.items()],
        )

    def model_loaded(self, models: Iterable[str], seconds: float) -> None:
        for model in models:
            self._load_seconds[model] = seconds

    def watch_jobs(self, load: Callable[[], tuple[int, int]]) -> Callable[[], None]:
        """Reports ``load`` (running, queued jobs) as a gauge; returns what stops it."""

        def samples() -> list[tuple[LabelValues, float]]:
            active, queued = load()
            return [(("active",), float(active)), (("queued",), float(queued))]

        return self._factory.gauge(
            "resultity_agent_jobs_in_progress",
            "Jobs on this agent: running in a slot (active), or queued for one.",
            ("state",),
            samples,
        )


@dataclass(slots=True)
class _Job:
    model: str
    assigned_at: float
    span: tracing.Span | None
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    tokens: int = 0


class JobTelemetry:
    """A ``JobSink`` passing reports to ``sink`` while measuring each job."""

    def __init__(self, sink: JobSink, metrics: AgentMetrics, *, node_id: str = "") -> None:
        self._sink = sink
        self._metrics = metrics
        self._jobs: dict[JobRef, _Job] = {}
        self.node_id = node_id

    def assigned(self, job: JobRef, assign: AssignCommand) -> None:
        spec = assign.spec
        span = None
        if tracing.enabled():
            operation = (
                "embeddings" if spec.embed else "chat" if spec.messages else "text_completion"
            )
            attributes: dict[str, tracing.AttributeValue] = {
                tracing.GEN_AI_OPERATION: operation,
                tracing.GEN_AI_PROVIDER: tracing.PROVIDER,
                tracing.GEN_AI_REQUEST_MODEL: spec.model,
                tracing.GEN_AI_REQUEST_MAX_TOKENS: spec.sampling.max_tokens,
                "resultity.job.id": job.job_id,
                "resultity.job.epoch": job.epoch,
                "resultity.node.id": self.node_id,
            }
            if spec.sampling.temperature is not None:
                attributes[tracing.GEN_AI_REQUEST_TEMPERATURE] = spec.sampling.temperature
            if spec.sampling.top_p is not None:
                attributes[tracing.GEN_AI_REQUEST_TOP_P] = spec.sampling.top_p
            span = tracing.start_span(
                f"{operation} {spec.model}", dict(assign.trace_context), attributes
            )
        self._jobs[job] = _Job(spec.model, time.monotonic(), span)

    def started(self, job: JobRef) -> None:
        state = self._jobs.get(job)
        if state is not None:
            state.started_at = time.monotonic()
            self._metrics.queue_wait.observe(state.started_at - state.assigned_at, state.model)
        self._sink.started(job)

    def waiting(self, job: JobRef) -> None:
        self._sink.waiting(job)

    def chunk(self, chunk: ChunkReport) -> None:
        state = self._jobs.get(JobRef(chunk.job_id, chunk.epoch))
        if state is not None and chunk.token_count:
            now = time.monotonic()
            if state.first_token_at is None:
                state.first_token_at = now
                began = state.started_at if state.started_at is not None else state.assigned_at
                self._metrics.time_to_first_token.observe(now - began, state.model)
            state.last_token_at = now
            state.tokens += chunk.token_count
        self._sink.chunk(chunk)

    def done(
        self,
        job: JobRef,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
    ) -> None:
        self._end(job, "done", prompt_tokens, completion_tokens, reason.value, cached_prompt_tokens)
        self._sink.done(job, reason, prompt_tokens, completion_tokens, cached_prompt_tokens)

    def failed(self, job: JobRef, kind: FailureKind, message: str, param: str = "") -> None:
        self._end(job, "failed", error=f"{kind.value}: {message}")
        self._sink.failed(job, kind, message, param)

    def cancelled(self, job: JobRef) -> None:
        """The network cancelled the job (or the session ended): no report follows."""
        self._end(job, "cancelled")

    def close(self) -> None:
        """The session ended: its jobs are cancelled."""
        for job in list(self._jobs):
            self._end(job, "cancelled")

    def _end(
        self,
        job: JobRef,
        outcome: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        finish_reason: str = "",
        cached_prompt_tokens: int = 0,
        error: str = "",
    ) -> None:
        state = self._jobs.pop(job, None)
        if state is None:
            return
        metrics = self._metrics
        metrics.jobs.inc(state.model, outcome)
        if prompt_tokens:
            metrics.prompt_tokens.inc(state.model, amount=prompt_tokens)
            cache = metrics.prompt_cache_tokens
            cache.inc(state.model, "reused", amount=cached_prompt_tokens)
            cache.inc(state.model, "evaluated", amount=prompt_tokens - cached_prompt_tokens)
        if state.tokens:
            metrics.generated_tokens.inc(state.model, amount=state.tokens)
        first = state.first_token_at
        if first is not None and state.tokens > 1 and state.last_token_at > first:
            metrics.decode_speed.observe(
                (state.tokens - 1) / (state.last_token_at - first), state.model
            )
        if state.span is not None:
            attributes: dict[str, tracing.AttributeValue] = {
                tracing.GEN_AI_INPUT_TOKENS: prompt_tokens,
                tracing.GEN_AI_OUTPUT_TOKENS: completion_tokens or state.tokens,
                "resultity.job.outcome": outcome,
            }
            if finish_reason:
                attributes[tracing.GEN_AI_FINISH_REASONS] = (finish_reason,)
            state.span.set_attributes(attributes)
            if error:
                tracing.fail(state.span, error)
            state.span.end()
