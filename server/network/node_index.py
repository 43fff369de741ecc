"""The router's index of nodes: by model, and by model and operator or region;
and by the fingerprints of the conversations they cache.

A decision draws its candidates from the smallest set that can hold every
eligible node: the nodes serving the model or, when the request names
operators or regions, those of the model with one of them. A subcloud of a
few operators in a large fleet thus samples its own nodes, not the fleet.
A node keeps its operator and region for its whole session, so its keys
never change while it is indexed.

A sample of a large pool would mostly leave out the node caching a chat's
conversation, so the index also maps each advertised fingerprint to the
nodes advertising it, for the router to add to its sample. A node's
fingerprints do change while it is indexed: the index follows them through
the node's ``prefix_listeners`` (advertised.py).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

from core.inference import NodeRequirements
from server.network.advertised import PrefixListener
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


class PrefixHolders:
    """Each advertised fingerprint's nodes: most fingerprints have one, a shared
    opening (a system prompt) may have many."""

    def __init__(self) -> None:
        # A lone holder is held as itself, several in a list: with 10,000 nodes
        # advertising 64 fingerprints each, a list per fingerprint took 83 MB
        # rather than 27 and made a full garbage collection half again as long.
        self._holders: dict[int, RoutableNode | list[RoutableNode]] = {}
        # The listener registered on each node followed, to unregister it.
        self._following: dict[str, PrefixListener] = {}

    def follow(self, node: RoutableNode) -> None:
        if node.node_id not in self._following:
            listener = self._following[node.node_id] = partial(self._moved, node)
            node.prefix_listeners.append(listener)
            self._add(node, node.cached_prefixes)

    def drop(self, node: RoutableNode) -> None:
        listener = self._following.pop(node.node_id, None)
        if listener is not None:
            node.prefix_listeners.remove(listener)
            self._remove(node, node.cached_prefixes)

    def holders(self, fingerprint: int) -> Sequence[RoutableNode]:
        held = self._holders.get(fingerprint)
        if held is None:
            return ()
        return held if isinstance(held, list) else (held,)

    def _moved(self, node: RoutableNode, old: frozenset[int], new: frozenset[int]) -> None:
        self._remove(node, old - new)
        self._add(node, new - old)

    def _add(self, node: RoutableNode, fingerprints: Iterable[int]) -> None:
        holders = self._holders
        for fingerprint in fingerprints:
            held = holders.setdefault(fingerprint, node)
            if held is node:  # the fingerprint's first holder: most often
                continue
            if isinstance(held, list):
                held.append(node)
            else:
                holders[fingerprint] = [held, node]

    def _remove(self, node: RoutableNode, fingerprints: Iterable[int]) -> None:
        for fingerprint in fingerprints:
            held = self._holders[fingerprint]
            if not isinstance(held, list):
                del self._holders[fingerprint]
                continue
            # By identity (nodes compare so): a scan, long only for a shared opening.
            held.remove(node)
            if len(held) == 1:
                self._holders[fingerprint] = held[0]


class NodeIndex:
    def __init__(self) -> None:
        self._lists: dict[_Key, NodeList] = {}
        self.prefixes = PrefixHolders()

    def add(self, node: RoutableNode, models: Iterable[str]) -> None:
        for model in models:
            for key in _keys(node, model):
                self._lists.setdefault(key, NodeList()).add(node)
        self.prefixes.follow(node)

    def serves(self, model: str, node: RoutableNode) -> bool:
        """Whether ``node`` is indexed for ``model``."""
        nodes = self._lists.get((model, _ALL, ""))
        return nodes is not None and node.node_id in nodes.positions

    def remove(self, node: RoutableNode) -> None:
        self.prefixes.drop(node)
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
