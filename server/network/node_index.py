"""The router's index of nodes: by model, and by model and operator or region.

A decision draws its candidates from the smallest set that can hold every
eligible node: the nodes serving the model or, when the request names
operators or regions, those of the model with one of them. A subcloud of a
few operators in a large fleet thus samples its own nodes, not the fleet.
A node keeps its operator and region for its whole session, so its keys
never change while it is indexed.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from core.inference import NodeRequirements
from server.network.routable import RoutableNode

# Index keys: (model, "", "") holds all nodes of a model; (model, OPERATOR, id)
# and (model, REGION, name) the model's nodes of one operator or region.
_ALL, OPERATOR, REGION = "", "operator", "region"
_Key = tuple[str, str, str]


@dataclass
class NodeList:
    """A list for O(1) random sampling, positions for O(1) removal."""

    nodes: list[RoutableNode] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)

    def add(self, node: RoutableNode) -> None:
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


@dataclass(frozen=True, slots=True)
class Pool:
    """The nodes a decision may draw from: disjoint lists, read in place."""

    lists: tuple[NodeList, ...] = ()

    def __len__(self) -> int:
        return sum(len(nodes.nodes) for nodes in self.lists)

    def __iter__(self) -> Iterator[RoutableNode]:
        return itertools.chain.from_iterable(nodes.nodes for nodes in self.lists)

    def sample(self, count: int, rng: random.Random) -> list[RoutableNode]:
        """``count`` distinct nodes drawn uniformly (``count`` at most the pool's size)."""
        if len(self.lists) == 1:
            return rng.sample(self.lists[0].nodes, count)
        ends = list(itertools.accumulate(len(nodes.nodes) for nodes in self.lists))
        picked = []
        for position in rng.sample(range(ends[-1]), count):
            which = bisect.bisect_right(ends, position)
            start = ends[which - 1] if which else 0
            picked.append(self.lists[which].nodes[position - start])
        return picked


class NodeIndex:
    def __init__(self) -> None:
        self._lists: dict[_Key, NodeList] = {}

    def add(self, node: RoutableNode, models: Iterable[str]) -> None:
        for model in models:
            for key in _keys(node, model):
                self._lists.setdefault(key, NodeList()).add(node)

    def remove(self, node: RoutableNode) -> None:
        for model in node.models:
            for key in _keys(node, model):
                nodes = self._lists.get(key)
                if nodes is not None:
                    nodes.remove(node.node_id)
                    if not nodes.nodes:
                        del self._lists[key]

    def pool(self, model: str, requirements: NodeRequirements) -> Pool:
        """The smallest indexed set holding every node of ``model`` that may meet
        ``requirements`` (the rules themselves are checked by the router's filter)."""
        pools = [self._pool(model, _ALL, ("",))]
        if requirements.operator_account_ids:
            pools.append(self._pool(model, OPERATOR, requirements.operator_account_ids))
        if requirements.regions:
            pools.append(self._pool(model, REGION, requirements.regions))
        return min(pools, key=len)

    def _pool(self, model: str, kind: str, values: Iterable[str]) -> Pool:
        lists = (self._lists.get((model, kind, value)) for value in values)
        return Pool(tuple(nodes for nodes in lists if nodes is not None))


def _keys(node: RoutableNode, model: str) -> Iterator[_Key]:
    yield (model, _ALL, "")
    if node.operator_account_id:
        yield (model, OPERATOR, node.operator_account_id)
    if node.region:
        yield (model, REGION, node.region)
