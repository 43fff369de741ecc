"""The Prometheus adapter of the metrics port, and the guard on caller-chosen labels."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.errors import RateLimited
from core.metrics import OTHER, LabelGuard
from core.prometheus import PrometheusMetrics
from server.cloud.rate_limits import FixedLimits, RateLimiter
from server.common.rate_limits import RateLimits


def _samples(metrics: PrometheusMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
        if sample.name.startswith("resultity_")
    }


def test_instruments_are_exposed_with_their_labels_and_declared_once() -> None:
    metrics = PrometheusMetrics()
    jobs = metrics.counter("resultity_test_jobs_total", "Jobs.", ("model", "outcome"))
    assert metrics.counter("resultity_test_jobs_total", "Jobs.", ("model", "outcome")) is jobs
    jobs.inc("m", "done")
    jobs.inc("m", "done", amount=2)
    latency = metrics.histogram("resultity_test_seconds", "Latency.", ("model",), (0.1, 1.0))
    latency.observe(0.5, "m")

    samples = _samples(metrics)
    assert (
        samples[("resultity_test_jobs_total", frozenset({("model", "m"), ("outcome", "done")}))]
        == 3
    )
    assert (
        samples[("resultity_test_seconds_bucket", frozenset({("model", "m"), ("le", "1.0")}))] == 1
    )
    assert (
        samples[("resultity_test_seconds_bucket", frozenset({("model", "m"), ("le", "0.1")}))] == 0
    )
    # No *_created series beside each counter: one series a label set.
    assert not any(name.endswith("_created") for name, _ in samples)


def test_a_gauge_adds_up_its_sources_when_collected_until_they_stop() -> None:
    metrics = PrometheusMetrics()
    nodes = {"ready": 2}
    stop_first = metrics.gauge(
        "resultity_test_nodes", "Nodes.", ("state",), lambda: [(("ready",), nodes["ready"])]
    )
    metrics.gauge("resultity_test_nodes", "Nodes.", ("state",), lambda: [(("ready",), 1.0)])
    assert _samples(metrics)[("resultity_test_nodes", frozenset({("state", "ready")}))] == 3

    nodes["ready"] = 5  # read at collection, not when it changed
    assert _samples(metrics)[("resultity_test_nodes", frozenset({("state", "ready")}))] == 6

    stop_first()
    assert _samples(metrics)[("resultity_test_nodes", frozenset({("state", "ready")}))] == 1


def test_a_label_guard_lets_a_bounded_number_of_values_through() -> None:
    guard = LabelGuard(limit=3)
    assert [guard(value) for value in ("a", "b", "a", "c", "d", "e", "b")] == [
        "a",
        "b",
        "a",
        "c",
        OTHER,
        OTHER,
        "b",
    ]


async def test_rate_limit_rejections_are_counted_by_the_limit_that_refused() -> None:
    metrics = PrometheusMetrics()
    rejections = metrics.counter("resultity_test_rejections_total", "Refused.", ("limit",))
    limiter = RateLimiter(
        FixedLimits(per_key=RateLimits(requests_per_minute=1)), rejections=rejections
    )
    await limiter.admit("key", "account", 10)
    with pytest.raises(RateLimited):
        await limiter.admit("key", "account", 10)
    assert (
        _samples(metrics)[("resultity_test_rejections_total", frozenset({("limit", "per_minute")}))]
        == 1
    )
