"""The Prometheus adapter of the metrics port (core/metrics.py), and its exposition.

One ``PrometheusMetrics`` per process: its registry holds every instrument the
process's roles declare (under `resultity up`, the gateway's and the three
services'), plus the process collector (CPU seconds, memory, open files). The
gateway serves it on `GET /metrics`; the gRPC services and the agent on their
own `--metrics-port` (``serve``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.metrics import LATENCY_BUCKETS, Counter, Histogram, LabelValues, Samples

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A *_created series beside every counter and histogram doubles the series for
# a start time the process collector already gives.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _Children:
    """A metric's children by label values, looked up without prometheus_client's
    validation on every call."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[LabelValues, Any] = {}

    def child(self, labels: LabelValues) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._metric.labels(*labels) if labels else self._metric
            self._children[labels] = child
        return child


class _Counter(_Children):
    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.child(labels).inc(amount)


class _Histogram(_Children):
    def observe(self, value: float, *labels: str) -> None:
        self.child(labels).observe(value)


class _Gauge(Collector):
    """A gauge family read from its sources at collection time."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._sources: list[Samples] = []
        self._lock = threading.Lock()

    def add(self, samples: Samples) -> Callable[[], None]:
        with self._lock:
            self._sources.append(samples)

        def remove() -> None:
            with self._lock:
                if samples in self._sources:
                    self._sources.remove(samples)

        return remove

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation, labels=self._labels)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labels)
        with self._lock:
            sources = list(self._sources)
        totals: dict[LabelValues, float] = {}
        for source in sources:
            for labels, value in source():
                totals[labels] = totals.get(labels, 0.0) + value
        for labels, value in totals.items():
            family.add_metric(list(labels), value)
        return [family]


class PrometheusMetrics:
    """A ``MetricsFactory`` over one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self._declared: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _declare(self, name: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            instrument = self._declared.get(name)
            if instrument is None:
                instrument = self._declared[name] = make()
            return instrument

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        counter: Counter = self._declare(
            name,
            lambda: _Counter(PromCounter(name, documentation, labels, registry=self.registry)),
        )
        return counter

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        histogram: Histogram = self._declare(
            name,
            lambda: _Histogram(
                PromHistogram(name, documentation, labels, registry=self.registry, buckets=buckets)
            ),
        )
        return histogram

    def gauge(
        self, name: str, documentation: str, labels: Sequence[str], samples: Samples
    ) -> Callable[[], None]:
        def make() -> _Gauge:
            gauge = _Gauge(name, documentation, labels)
            self.registry.register(gauge)
            return gauge

        gauge: _Gauge = self._declare(name, make)
        return gauge.add(samples)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serves the exposition at http://host:port/metrics from a thread of this
        process; returns the port bound (``port`` 0: any free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
