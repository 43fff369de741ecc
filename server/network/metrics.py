"""What the network measures: jobs, routing decisions, failovers, canaries, and its
nodes.

The fleet's gauges are read from the connected nodes when the metrics are
collected, never on a job's path. Each replica reports the nodes connected to
it, so a node appears once across replicas. Node ids label only the per-node
job gauges: they are bounded by the fleet, which a deployment sizes; every
other label is a catalog model, a region an operator declared, or a fixed set.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable

from core.metrics import DECISION_BUCKETS, NO_METRICS, LabelValues, MetricsFactory
from server.network.nodes import NodeSession

UNDECLARED_REGION = "undeclared"


class NetworkMetrics:
    def __init__(self, metrics: MetricsFactory = NO_METRICS) -> None:
        self._factory = metrics
        self.routing_decision = metrics.histogram(
            "resultity_routing_decision_seconds",
            "Time the router took to pick a node for a job (or to find none).",
            ("result",),
            DECISION_BUCKETS,
        )
        self.routing_affinity = metrics.counter(
            "resultity_routing_affinity_total",
            "Nodes picked for jobs (first assignments and migrations), by model and how "
            "prefix affinity fared: hit (the node advertises a prefix of the request's "
            "conversation), passed_over (a candidate advertising one lost to a less busy "
            "node), miss (no candidate advertises one), none (no conversation: text "
            "completions, embeddings).",
            ("model", "outcome"),
        )
        self.jobs = metrics.counter(
            "resultity_network_jobs_total",
            "Jobs dispatched by this replica, by model and outcome (finished, failed, cancelled).",
            ("model", "outcome"),
        )
        self.failovers = metrics.counter(
            "resultity_job_failovers_total",
            "Jobs that lost their node mid-job: migrated to another node, or abandoned "
            "(no other node, or out of migrations).",
            ("model", "result"),
        )
        self.canaries = metrics.counter(
            "resultity_canaries_total",
            "Known-answer canaries checked, by model, phase (join validation or in "
            "service) and result.",
            ("model", "phase", "result"),
        )

    def watch_nodes(
        self, nodes: Callable[[], list[NodeSession]], suspect_after_s: Callable[[], float]
    ) -> Callable[[], None]:
        """Reports the connected ``nodes`` as gauges; returns what stops it."""
        stops = (
            self._factory.gauge(
                "resultity_nodes",
                "Connected nodes by state, model served or offered, and declared region.",
                ("state", "model", "region"),
                lambda: _by_state(nodes(), suspect_after_s()),
            ),
            self._factory.gauge(
                "resultity_node_jobs",
                "Jobs on each connected node: active (assigned by the network) and "
                "queued (waiting for a slot, as the node last reported).",
                ("node", "state"),
                lambda: _jobs(nodes()),
            ),
        )

        def stop() -> None:
            for each in stops:
                each()

        return stop


def _by_state(
    nodes: list[NodeSession], suspect_after_s: float
) -> Iterable[tuple[LabelValues, float]]:
    now = time.monotonic()
    counts: Tally[LabelValues] = Tally()
    for node in nodes:
        state = node.state(now, suspect_after_s).value
        region = node.region or UNDECLARED_REGION
        for model in node.models:
            counts[(state, model, region)] += 1
    return [(labels, float(count)) for labels, count in counts.items()]


def _jobs(nodes: list[NodeSession]) -> Iterable[tuple[LabelValues, float]]:
    samples: list[tuple[LabelValues, float]] = []
    for node in nodes:
        samples.append(((node.node_id, "active"), float(len(node.active_jobs))))
        samples.append(((node.node_id, "queued"), float(node.queued_jobs)))
    return samples
