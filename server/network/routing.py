"""Choosing the node for a job: a chain of small policies over an index by model.

A decision is ``filters`` then ``scorers``:

- the index holds, per model, the nodes serving it, so a decision never looks
  at nodes of other models;
- candidates are all of the model's nodes when there are at most
  ``sample_size`` of them, otherwise a random sample of that many (the "power
  of d choices": a few random candidates balance load nearly as well as a
  full scan, at a cost independent of the fleet size). If no sampled node
  passes the filters, the decision falls back to a full scan;
- the index holds a node under a model only once the node passed validation
  for it (validation.py);
- every filter must accept a candidate (serves the model, ready: not draining,
  not suspect, not validating, not quarantined, not excluded for this job);
- every scorer returns a value in [0, 1], higher is better; the weighted sum
  ranks the candidates, and ties go to the node that has waited longest since
  it was last given a job, so equal nodes share work round-robin.

New policies (prefix affinity: prefer the node whose cache holds the prompt's
prefix) are one more scorer reading a field of ``RouteRequest``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.network.nodes import NodeSession, NodeState

DEFAULT_SAMPLE_SIZE = 32


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    # Nodes the job may not go to (those it already ran on).
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What policies may read besides the node: the request, the time, the peers."""

    request: RouteRequest
    now: float
    suspect_after_s: float
    # Best measured speed among the candidates, for relative speed scores.
    best_tokens_per_second: float = 0.0


class NodeFilter(Protocol):
    def __call__(self, node: NodeSession, context: RouteContext) -> bool: ...


@dataclass(frozen=True, slots=True)
class NodeScorer:
    name: str
    weight: float
    score: ScoreFunction


class ScoreFunction(Protocol):
    def __call__(self, node: NodeSession, context: RouteContext) -> float: ...


# --- filters -----------------------------------------------------------------


def serves_model(node: NodeSession, context: RouteContext) -> bool:
    return context.request.model in node.models


def is_ready(node: NodeSession, context: RouteContext) -> bool:
    """Heard from recently; not quarantined, draining or validating."""
    return node.state(context.now, context.suspect_after_s) is NodeState.READY


def not_excluded(node: NodeSession, context: RouteContext) -> bool:
    return node.node_id not in context.request.exclude


# --- scorers -----------------------------------------------------------------


def load_score(node: NodeSession, context: RouteContext) -> float:
    """1 when idle, falling as the node's slots fill (and its queue grows)."""
    return 1.0 / (1.0 + node.load)


def reputation_score(node: NodeSession, context: RouteContext) -> float:
    """The node's canary record in [0, 1] (quarantined nodes are filtered out)."""
    return node.reputation


def speed_score(node: NodeSession, context: RouteContext) -> float:
    """Measured recent tokens/s relative to the fastest candidate; 0 if unmeasured."""
    if context.best_tokens_per_second <= 0.0:
        return 0.0
    return node.recent_tokens_per_second / context.best_tokens_per_second


DEFAULT_FILTERS: tuple[NodeFilter, ...] = (serves_model, is_ready, not_excluded)
# Load dominates: one more job on an idle 1-slot node (1.0 -> 0.5) outweighs
# any speed difference; speed decides between similarly loaded nodes.
DEFAULT_SCORERS: tuple[NodeScorer, ...] = (
    NodeScorer("load", 1.0, load_score),
    NodeScorer("speed", 0.25, speed_score),
    NodeScorer("reputation", 0.25, reputation_score),
)


@dataclass
class _ModelNodes:
    """Nodes of one model: a list for O(1) random sampling, positions for O(1) removal."""

    nodes: list[NodeSession] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)

    def add(self, node: NodeSession) -> None:
        if node.node_id in self.positions:
            return
        self.positions[node.node_id] = len(self.nodes)
        self.nodes.append(node)

    def remove(self, node_id: str) -> None:
        index = self.positions.pop(node_id, None)
        if index is None:
            return
        last = self.nodes.pop()
        if index < len(self.nodes):
            self.nodes[index] = last
            self.positions[last.node_id] = index


class Router:
    def __init__(
        self,
        *,
        suspect_after_s: float,
        filters: Sequence[NodeFilter] = DEFAULT_FILTERS,
        scorers: Sequence[NodeScorer] = DEFAULT_SCORERS,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        rng: random.Random | None = None,
    ) -> None:
        self._suspect_after_s = suspect_after_s
        self._filters = tuple(filters)
        self._scorers = tuple(scorers)
        self._sample_size = sample_size
        self._rng = rng or random.Random()
        self._by_model: dict[str, _ModelNodes] = {}
        self._sequence = itertools.count()
        self._last_assigned: dict[str, int] = {}

    def add(self, node: NodeSession, models: Iterable[str] | None = None) -> None:
        """Indexes the node for ``models`` (default: all it offers); a node is indexed
        for a model once it passed validation for it."""
        for model in node.models if models is None else models:
            self._by_model.setdefault(model, _ModelNodes()).add(node)

    def remove(self, node: NodeSession) -> None:
        for model in node.models:
            nodes = self._by_model.get(model)
            if nodes is not None:
                nodes.remove(node.node_id)
                if not nodes.nodes:
                    del self._by_model[model]
        self._last_assigned.pop(node.node_id, None)

    def count(self, model: str) -> int:
        nodes = self._by_model.get(model)
        return len(nodes.nodes) if nodes else 0

    def pick(self, request: RouteRequest, now: float) -> NodeSession | None:
        """The best node for ``request``, recorded as assigned; None if none qualifies."""
        indexed = self._by_model.get(request.model)
        if indexed is None:
            return None
        context = RouteContext(request, now, self._suspect_after_s)
        pool = indexed.nodes
        if len(pool) > self._sample_size:
            chosen = self._best(self._rng.sample(pool, self._sample_size), context)
            if chosen is None:
                chosen = self._best(pool, context)
        else:
            chosen = self._best(pool, context)
        if chosen is not None:
            self._last_assigned[chosen.node_id] = next(self._sequence)
        return chosen

    def _best(self, nodes: Sequence[NodeSession], context: RouteContext) -> NodeSession | None:
        candidates = [node for node in nodes if all(f(node, context) for f in self._filters)]
        if not candidates:
            return None
        fastest = max(node.recent_tokens_per_second for node in candidates)
        scoring = RouteContext(
            context.request, context.now, context.suspect_after_s, best_tokens_per_second=fastest
        )
        last = self._last_assigned

        def rank(node: NodeSession) -> tuple[float, int]:
            total = sum(s.weight * s.score(node, scoring) for s in self._scorers)
            return (-total, last.get(node.node_id, -1))

        return min(candidates, key=rank)
