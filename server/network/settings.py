"""Typed settings of the network service: liveness and failover."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    """When a silent node stops getting jobs, and when it is given up.

    Agents heartbeat every ``heartbeat_interval_s``; any message counts as a
    sign of life. A node silent for ``suspect_after_s`` is not routed to; one
    silent for ``heartbeat_timeout_s`` is removed and its jobs migrate.
    """

    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    # Unset: half the timeout (15 s with the defaults).
    suspect_after_s: float | None = None

    @property
    def suspect_s(self) -> float:
        if self.suspect_after_s is None:
            return self.heartbeat_timeout_s / 2
        return min(self.suspect_after_s, self.heartbeat_timeout_s)


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """How a job survives the loss of its node."""

    # Times one job may move to another node before it fails.
    max_migrations: int = 2
    # A node that sends nothing for a running job this long is given up for that
    # job (it may be stuck or partitioned) and the job moves on. Generous: a job
    # prefilling a long prompt sends nothing. Counted from the job's start on the
    # node (JobStarted), not from its assignment: time in the node's queue is
    # bounded by queue_timeout_s instead. A job the node's scheduler holds back
    # is reported waiting (JobWaiting) four times per stall timeout, at least
    # every 5 s: the welcome tells each agent this timeout, so any value holds.
    stall_timeout_s: float = 60.0
    # A job still waiting in its node's queue this long after assignment fails
    # with NO_CAPACITY and a retry hint (a 503 with retry-after), instead of
    # waiting on behind the node's running jobs.
    queue_timeout_s: float = 30.0
    queue_retry_after_s: int = 5


@dataclass(frozen=True, slots=True)
class ValidationSettings:
    """Join-time validation and in-service canaries (see validation.py).

    With ``enabled`` off, nodes serve every catalog model they offer unchecked
    and no canaries are sent unless an operator sets a canary rate in the
    network configuration.
    """

    enabled: bool = True
    # Share of dispatched jobs that also send the node a disguised canary;
    # the initial canary_rate of the network configuration.
    canary_rate: float = 0.02
    # Reputation is an EWMA of canary results (1 pass, 0 fail) with this weight
    # for the newest; below the threshold the node is quarantined. With the
    # defaults two failures in a row from a perfect record quarantine a node.
    reputation_alpha: float = 0.3
    quarantine_below: float = 0.5
    # The join benchmark fails a node slower than this (0: any speed passes).
    min_tokens_per_second: float = 0.0
    # Tokens the join benchmark generates.
    benchmark_tokens: int = 16
