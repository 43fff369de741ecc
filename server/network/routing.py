"""Choosing the node for a job: a chain of small policies over an index by model.

A decision is ``filters`` then ``scorers``:

- the index (node_index.py) holds, per model, the nodes serving it, and per
  model the nodes of each operator and region, so a decision never looks at
  nodes of other models, nor, when the request names operators or regions,
  at nodes outside them;
- candidates are all of that pool when it holds at most ``sample_size``
  nodes, otherwise a random sample of that many (the "power of d choices": a
  few random candidates balance load nearly as well as a full scan, at a
  cost independent of the fleet size), plus the pool's nodes that advertise
  the request's conversation (below). If no such candidate passes the
  filters, the decision falls back to a full scan of the pool;
- the index holds a node under a model only once the node passed validation
  for it (validation.py);
- every filter must accept a candidate (serves the model, ready: not draining,
  not suspect, not validating, not quarantined, not excluded for this job,
  and meeting the request's node requirements: operator, region, minimum
  reputation, verified);
- every scorer returns a value in [0, 1], higher is better; the weighted sum
  ranks the candidates, and ties go to the node that has waited longest since
  it was last given a job, so equal nodes share work round-robin.

Prefix affinity is one such scorer: a chat request carries the fingerprints
of its messages' prefixes (core/prompt_prefixes.py), nodes advertise those of
the conversations their caches hold, and the node holding the longest prefix
of the request gains, so a conversation's next turn lands where its start is
already computed. A sample of a large pool would mostly leave that node out,
so the index maps fingerprints to the nodes advertising them, and a sampled
decision adds up to ``AFFINITY_HOLDERS`` eligible holders of the request's
``AFFINITY_LOOKUPS`` longest prefixes (longest first) to its candidates: a
bounded cost whatever the fleet's size. Each decision says how affinity fared
(``Affinity``), for the operators' metrics.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from core.inference import GenerationSpec, NodeRequirements
from core.prompt_prefixes import longest_cached_prefix, prefix_fingerprints
from server.network.node_index import NodeIndex
from server.network.nodes import NodeState
from server.network.routable import RoutableNode

DEFAULT_SAMPLE_SIZE = 32
# A chat's next turn repeats the conversation its node cached plus the answer
# and one new message, so its second-longest prefix is the one held; a tool
# loop's turn may add several tool results. The longest 8 are looked up.
AFFINITY_LOOKUPS = 8
# At most this many holders join a sample: a few, so that a shared opening
# (a system prompt many nodes cache) cannot crowd out the sample's balance.
AFFINITY_HOLDERS = 4
# Any ready node serving the model.
NO_REQUIREMENTS = NodeRequirements()


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    # Nodes the job may not go to (those it already ran on).
    exclude: frozenset[str] = frozenset()
    # Which nodes may run the job at all (a subcloud's rules, a region).
    requirements: NodeRequirements = NO_REQUIREMENTS
    # The fingerprints of the request's conversation (``job_prefixes``); none
    # for text completions and embeddings.
    prefixes: tuple[int, ...] = ()


class Affinity(StrEnum):
    """How a routed request's conversation fared: a chat turn should land where
    its start is cached."""

    # The chosen node advertises a prefix of the request.
    HIT = "hit"
    # A candidate advertising one passed the filters, but another node won: the
    # holder was busier (or had no free slot, which earns no affinity at all).
    PASSED_OVER = "passed_over"
    # No candidate advertises one: a first turn, or the conversation's cache is
    # gone (evicted, its node left). Above ``sample_size`` nodes of a pool the
    # candidates are a sample plus a few holders of the request's longest
    # prefixes, which may leave out a holder of a shorter one, or one of many
    # holders of the same prefix.
    MISS = "miss"
    # The request carries no fingerprints (a text completion, an embedding).
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Route:
    node: RoutableNode
    affinity: Affinity


def job_prefixes(spec: GenerationSpec) -> tuple[int, ...]:
    """What a job's route requests carry to find the node caching its conversation."""
    if spec.prompt is not None or spec.embed:
        return ()
    return prefix_fingerprints(spec.model, spec.tool_use, spec.messages)


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What policies may read besides the node: the request, the time, the peers."""

    request: RouteRequest
    now: float
    suspect_after_s: float
    # Best measured speed among the candidates, for relative speed scores.
    best_tokens_per_second: float = 0.0


class NodeFilter(Protocol):
    def __call__(self, node: RoutableNode, context: RouteContext) -> bool: ...


@dataclass(frozen=True, slots=True)
class NodeScorer:
    name: str
    weight: float
    score: ScoreFunction


class ScoreFunction(Protocol):
    def __call__(self, node: RoutableNode, context: RouteContext) -> float: ...


# --- filters -----------------------------------------------------------------


def serves_model(node: RoutableNode, context: RouteContext) -> bool:
    return context.request.model in node.models


def is_ready(node: RoutableNode, context: RouteContext) -> bool:
    """Heard from recently; not quarantined, draining or validating."""
    return node.state(context.now, context.suspect_after_s) is NodeState.READY


def not_excluded(node: RoutableNode, context: RouteContext) -> bool:
    return node.node_id not in context.request.exclude


def meets(node: RoutableNode, requirements: NodeRequirements) -> bool:
    """Whether the node satisfies every rule that is set."""
    operators, regions = requirements.operator_account_ids, requirements.regions
    if operators and (not node.operator_account_id or node.operator_account_id not in operators):
        return False
    if regions and (not node.region or node.region not in regions):
        return False
    if node.standing.reputation < requirements.min_reputation:
        return False
    return node.verified or not requirements.verified_only


def meets_requirements(node: RoutableNode, context: RouteContext) -> bool:
    return meets(node, context.request.requirements)


# --- scorers -----------------------------------------------------------------


def load_score(node: RoutableNode, context: RouteContext) -> float:
    """1 when idle, falling as the node's slots fill (and its queue grows)."""
    return 1.0 / (1.0 + node.load)


def reputation_score(node: RoutableNode, context: RouteContext) -> float:
    """The node's canary record in [0, 1] (quarantined nodes are filtered out)."""
    return node.standing.reputation


def speed_score(node: RoutableNode, context: RouteContext) -> float:
    """Measured recent tokens/s relative to the fastest candidate; 0 if unmeasured."""
    if context.best_tokens_per_second <= 0.0:
        return 0.0
    return node.recent_tokens_per_second / context.best_tokens_per_second


def prefix_score(node: RoutableNode, context: RouteContext) -> float:
    """The share of the request's messages the node holds cached as a prefix; 0
    for a node with no free slot: a job queued behind another's whole generation
    waits longer than a cold prefill elsewhere takes."""
    prefixes, cached = context.request.prefixes, node.cached_prefixes
    # Most candidates hold none of the request: one C-level pass tells.
    if not prefixes or node.load >= 1.0 or cached.isdisjoint(prefixes):
        return 0.0
    return longest_cached_prefix(prefixes, cached) / len(prefixes)


DEFAULT_FILTERS: tuple[NodeFilter, ...] = (
    serves_model,
    is_ready,
    not_excluded,
    meets_requirements,
)
# Load dominates: one more job on an idle 1-slot node (1.0 -> 0.5) outweighs
# any speed difference; speed decides between similarly loaded nodes.
#
# A cached prefix is worth up to 0.6. A chat's next turn finds all its messages
# but the new one cached: 2/3 of them (user, assistant, user) or more, worth
# 0.4 to 0.6. That outweighs any speed difference (at most 0.25) and the load
# score's lead of an idle node over a half-busy one (1.0 vs 0.67), so the turn
# goes where its conversation is cached while that node is as busy as the
# others or a little busier. It stops short of the lead over a node three
# quarters busy (1.0 vs 0.57, for a 2/3 share), and a node with no free slot
# gets no affinity at all: a node holding popular conversations sheds new work
# to the others rather than queue it.
DEFAULT_SCORERS: tuple[NodeScorer, ...] = (
    NodeScorer("load", 1.0, load_score),
    NodeScorer("prefix", 0.6, prefix_score),
    NodeScorer("speed", 0.25, speed_score),
    NodeScorer("reputation", 0.25, reputation_score),
)


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
        self.suspect_after_s = suspect_after_s
        self._filters = tuple(filters)
        self._scorers = tuple(scorers)
        self._sample_size = sample_size
        self._rng = rng or random.Random()
        self._index = NodeIndex()
        self._sequence = itertools.count()
        self._last_assigned: dict[str, int] = {}

    def add(self, node: RoutableNode, models: Iterable[str] | None = None) -> None:
        """Indexes the node for ``models`` (default: all it offers); a node is indexed
        for a model once it passed validation for it."""
        self._index.add(node, node.models if models is None else models)

    def remove(self, node: RoutableNode) -> None:
        self._index.remove(node)
        self._last_assigned.pop(node.node_id, None)

    def count(self, model: str, requirements: NodeRequirements = NO_REQUIREMENTS) -> int:
        """Nodes serving ``model`` (live, whatever their load) that meet ``requirements``."""
        pool = self._index.pool(model, requirements)
        if requirements == NO_REQUIREMENTS:
            return len(pool)
        return sum(1 for node in pool if meets(node, requirements))

    def pick(self, request: RouteRequest, now: float) -> Route | None:
        """The best node for ``request``, recorded as assigned; None if none qualifies."""
        pool = self._index.pool(request.model, request.requirements)
        context = RouteContext(request, now, self.suspect_after_s)
        if len(pool) > self._sample_size:
            sample = pool.sample(self._sample_size, self._rng)
            sample += self._holders(sample, context)
            chosen = self._best(sample, context)
            if chosen is None:
                chosen = self._best(pool, context)
        else:
            chosen = self._best(pool, context)
        if chosen is not None:
            self._last_assigned[chosen.node.node_id] = next(self._sequence)
        return chosen

    def _holders(self, sample: list[RoutableNode], context: RouteContext) -> list[RoutableNode]:
        """Eligible nodes of the pool, not in ``sample``, advertising the request's
        longest prefixes: at most ``AFFINITY_HOLDERS`` of each prefix's holders
        (drawn at random when there are more) are looked at, and as many taken."""
        request = context.request
        extra: list[RoutableNode] = []
        for fingerprint in reversed(request.prefixes[-AFFINITY_LOOKUPS:]):
            holders = self._index.prefixes.holders(fingerprint)
            if len(holders) > AFFINITY_HOLDERS:
                holders = self._rng.sample(holders, AFFINITY_HOLDERS)
            for node in holders:
                # By identity (nodes compare so): a holder is rare, a scan cheap.
                if (
                    node not in sample
                    and node not in extra
                    and self._index.serves(request.model, node)
                    and all(f(node, context) for f in self._filters)
                ):
                    extra.append(node)
                    if len(extra) == AFFINITY_HOLDERS:
                        return extra
        return extra

    def _best(self, nodes: Iterable[RoutableNode], context: RouteContext) -> Route | None:
        candidates = [node for node in nodes if all(f(node, context) for f in self._filters)]
        if not candidates:
            return None
        fastest = max(node.recent_tokens_per_second for node in candidates)
        scoring = RouteContext(
            context.request, context.now, context.suspect_after_s, best_tokens_per_second=fastest
        )
        last = self._last_assigned

        def rank(node: RoutableNode) -> tuple[float, int]:
            total = sum(s.weight * s.score(node, scoring) for s in self._scorers)
            return (-total, last.get(node.node_id, -1))

        chosen = min(candidates, key=rank)
        return Route(chosen, _affinity(context.request.prefixes, chosen, candidates))


def _affinity(
    prefixes: tuple[int, ...], chosen: RoutableNode, candidates: list[RoutableNode]
) -> Affinity:
    if not prefixes:
        return Affinity.NONE
    if not chosen.cached_prefixes.isdisjoint(prefixes):
        return Affinity.HIT
    # Only when the chosen node holds none: one more C-level pass per candidate.
    if any(not node.cached_prefixes.isdisjoint(prefixes) for node in candidates):
        return Affinity.PASSED_OVER
    return Affinity.MISS
