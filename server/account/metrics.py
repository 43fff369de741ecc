"""What the ledger measures of holds: taken, settled, and released at expiry.

Counted as the ledger applies them (a replayed call counts again: it is one
more request the ledger answered); no account or hold ids.
"""

from __future__ import annotations

from core.metrics import NO_METRICS, MetricsFactory


class LedgerMetrics:
    def __init__(self, metrics: MetricsFactory = NO_METRICS) -> None:
        self.holds_created = metrics.counter(
            "resultity_holds_created_total", "Holds taken on accounts' credits."
        )
        self.holds_settled = metrics.counter(
            "resultity_holds_settled_total",
            "Holds settled: what was used captured, the rest released.",
        )
        self.holds_expired = metrics.counter(
            "resultity_holds_expired_total",
            "Holds released whole because they expired unsettled.",
        )
