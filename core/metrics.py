"""Metrics as a port: what domain code counts and times, with no monitoring library.

Each role declares its instruments once (gateway/metrics.py, server/*/metrics.py,
agent/metrics.py) through a ``MetricsFactory``; the service code holding them
calls ``inc`` and ``observe`` and knows nothing of Prometheus. The Prometheus
adapter (core/prometheus.py) is plugged in by the process's composition root;
everything else, tests included, gets ``NO_METRICS``, whose instruments do
nothing.

Label values are positional, in the order the instrument declared its label
names. Label sets must stay bounded: no request, job or key ids, no account
ids, nothing a caller chooses freely unless it went through a ``LabelGuard``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

# Seconds. Time to first token and whole requests: from a few milliseconds on
# loopback to minutes of a long generation on a slow node.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Seconds between two tokens of one job.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
# Seconds of control-plane work done in memory (a routing decision).
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05)
# Tokens per second of one job's decoding.
SPEED_BUCKETS = (1.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 200.0, 400.0, 1000.0)

LabelValues = tuple[str, ...]
# A gauge's current samples, read when the metrics are collected (not on any
# request's path): (label values, value) pairs.
Samples = Callable[[], Iterable[tuple[LabelValues, float]]]


class Counter(Protocol):
    def inc(self, *labels: str, amount: float = 1.0) -> None: ...


class Histogram(Protocol):
    def observe(self, value: float, *labels: str) -> None: ...


class MetricsFactory(Protocol):
    """Declares instruments; declaring the same name again returns the same one."""

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter: ...

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram: ...

    def gauge(
        self, name: str, documentation: str, labels: Sequence[str], samples: Samples
    ) -> Callable[[], None]:
        """A gauge whose samples ``samples`` gives when collected; several sources of
        one name are reported together. Returns what stops reading this source."""
        ...


class _NoInstrument:
    def inc(self, *labels: str, amount: float = 1.0) -> None:
        pass

    def observe(self, value: float, *labels: str) -> None:
        pass


# An instrument that records nothing, for code given none.
NO_COUNTER: Counter = _NoInstrument()
NO_HISTOGRAM: Histogram = _NoInstrument()


class NoMetrics:
    """Instruments that record nothing: metrics are off, or nothing reads them."""

    _instrument = _NoInstrument()

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return self._instrument

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._instrument

    def gauge(
        self, name: str, documentation: str, labels: Sequence[str], samples: Samples
    ) -> Callable[[], None]:
        return _nothing


def _nothing() -> None:
    pass


NO_METRICS: MetricsFactory = NoMetrics()

OTHER = "other"


class LabelGuard:
    """Bounds a label whose values come from outside (a model name a caller typed):
    the first ``limit`` distinct values pass, any later new one becomes "other"."""

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
        return value
