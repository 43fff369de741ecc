"""The agent measures each job however it ends, and passes every report on unchanged."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agent.runner import JobRef
from agent.telemetry import AgentMetrics, JobTelemetry
from core.agent_messages import AssignCommand, ChunkReport, FailureKind
from core.inference import ChatMessage, ChatRole, FinishReason, GenerationSpec, Sampling
from core.prometheus import PrometheusMetrics

MODEL = "m"


class _Sink:
    def __init__(self) -> None:
        self.reports: list[tuple[str, object]] = []

    def chunk(self, chunk: ChunkReport) -> None:
        self.reports.append(("chunk", chunk.token_count))

    def done(
        self,
        job: JobRef,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
    ) -> None:
        self.reports.append(("done", (completion_tokens, cached_prompt_tokens)))

    def started(self, job: JobRef) -> None:
        self.reports.append(("started", job.job_id))

    def waiting(self, job: JobRef) -> None:
        self.reports.append(("waiting", job.job_id))

    def failed(self, job: JobRef, kind: FailureKind, message: str, param: str = "") -> None:
        self.reports.append(("failed", kind))


def _assign(job: JobRef) -> AssignCommand:
    spec = GenerationSpec(MODEL, (ChatMessage(ChatRole.USER, "hi"),), Sampling(max_tokens=8), 100)
    return AssignCommand(job.job_id, job.epoch, spec)


def _run(telemetry: JobTelemetry, job: JobRef, tokens: int) -> None:
    telemetry.assigned(job, _assign(job))
    telemetry.started(job)
    for _ in range(tokens):
        telemetry.chunk(ChunkReport(job.job_id, job.epoch, "x", 1, 3))


def _value(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_every_ending_is_counted_with_the_tokens_sent() -> None:
    metrics = PrometheusMetrics()
    sink = _Sink()
    telemetry = JobTelemetry(sink, AgentMetrics(metrics))
    done, failed, cancelled, dropped = (JobRef(name, 1) for name in ("a", "b", "c", "d"))

    _run(telemetry, done, 3)
    telemetry.done(done, FinishReason.STOP, 3, 3, 2)
    _run(telemetry, failed, 1)
    telemetry.failed(failed, FailureKind.RUNTIME_ERROR, "boom")
    _run(telemetry, cancelled, 2)
    telemetry.cancelled(cancelled)
    _run(telemetry, dropped, 0)
    telemetry.close()  # the session ended with the job still running

    for outcome, count in (("done", 1), ("failed", 1), ("cancelled", 2)):
        assert _value(metrics, "resultity_agent_jobs_total", model=MODEL, outcome=outcome) == count
    assert _value(metrics, "resultity_agent_generated_tokens_total", model=MODEL) == 6
    assert _value(metrics, "resultity_agent_prompt_tokens_total", model=MODEL) == 3
    # Of those, what the runtime's cache held and what it evaluated.
    cache = "resultity_agent_prompt_cache_tokens_total"
    assert _value(metrics, cache, model=MODEL, result="reused") == 2
    assert _value(metrics, cache, model=MODEL, result="evaluated") == 1
    assert _value(metrics, "resultity_agent_time_to_first_token_seconds_count", model=MODEL) == 3
    # What the network hears is exactly what the runner reported.
    assert [kind for kind, _ in sink.reports].count("chunk") == 6
    assert ("done", (3, 2)) in sink.reports
    assert ("failed", FailureKind.RUNTIME_ERROR) in sink.reports
