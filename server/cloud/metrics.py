"""What cloud measures of the requests it admits, and of their settlement.

Models are catalog models (the request was admitted, so its model resolved);
operations and outcomes are fixed sets; no request, key or account ids.
Latencies are cloud's view: from the request's arrival at cloud (before
admission) to its first token, and to its end; the gap between tokens is each
job's mean after its first token (a chunk may carry several tokens).
"""

from __future__ import annotations

from core.metrics import (
    LATENCY_BUCKETS,
    NO_METRICS,
    TOKEN_GAP_BUCKETS,
    MetricsFactory,
)

# A request's operation, by the prefix of its completion id.
OPERATIONS = {"chatcmpl": "chat", "cmpl": "text_completion", "embd": "embeddings"}
COMPLETED = "completed"
CANCELLED = "cancelled"


class CloudMetrics:
    def __init__(self, metrics: MetricsFactory = NO_METRICS) -> None:
        self.requests = metrics.counter(
            "resultity_inference_requests_total",
            "Admitted inference requests by operation, model and outcome (completed, "
            "cancelled, or the error reason, e.g. insufficient_quota, no_capacity).",
            ("operation", "model", "outcome"),
        )
        self.time_to_first_token = metrics.histogram(
            "resultity_time_to_first_token_seconds",
            "Time from a request's arrival at cloud to its first generated token.",
            ("model",),
            LATENCY_BUCKETS,
        )
        self.inter_token_latency = metrics.histogram(
            "resultity_inter_token_latency_seconds",
            "Mean time between tokens of one job after its first token.",
            ("model",),
            TOKEN_GAP_BUCKETS,
        )
        self.request_duration = metrics.histogram(
            "resultity_request_duration_seconds",
            "Time from a request's arrival at cloud to its end (settled or failed).",
            ("operation", "model"),
            LATENCY_BUCKETS,
        )
        self.prompt_tokens = metrics.counter(
            "resultity_prompt_tokens_total", "Prompt tokens billed, by model.", ("model",)
        )
        self.completion_tokens = metrics.counter(
            "resultity_completion_tokens_total",
            "Completion tokens delivered and billed, by model.",
            ("model",),
        )
        self.rate_limit_rejections = metrics.counter(
            "resultity_rate_limit_rejections_total",
            "Requests refused by a rate limit: too many in flight, or over the requests "
            "or tokens per minute.",
            ("limit",),
        )
        self.settlements = metrics.counter(
            "resultity_settlements_total",
            "Settlements by how they first went out: applied by the ledger, queued for "
            "it (the ledger unreachable), or kept in memory (the queue unreachable too).",
            ("path",),
        )
        self.inference_logs_written = metrics.counter(
            "resultity_inference_logs_written_total",
            "Inference logs stored (requests of accounts that opted in).",
        )
        self.inference_logs_dropped = metrics.counter(
            "resultity_inference_logs_dropped_total",
            "Inference logs given up rather than delay a request: the writer's queue full "
            "(queue_full), the database failing (store_failed), or not stored before "
            "shutdown (shutdown).",
            ("reason",),
        )
        self.settlement_failures = metrics.counter(
            "resultity_settlement_failures_total",
            "Settlement attempts that failed: the ledger or the queue unreachable, "
            "another ledger error (retried), or a deferred settlement refused for good.",
            ("reason",),
        )
