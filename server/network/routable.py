"""What the router reads of a node: a local session (nodes.NodeSession) or a node
another network replica owns, seen through presence (remote_nodes.RemoteNode)."""

from __future__ import annotations

from typing import Protocol

from server.network.advertised import PrefixListener
from server.network.nodes import NodeStanding, NodeState


class RoutableNode(Protocol):
    # One per router index holding the node (advertised.py).
    prefix_listeners: list[PrefixListener]

    @property
    def node_id(self) -> str: ...

    @property
    def models(self) -> frozenset[str]: ...

    @property
    def region(self) -> str: ...

    @property
    def operator_account_id(self) -> str: ...

    @property
    def standing(self) -> NodeStanding: ...

    @property
    def verified(self) -> bool: ...

    @property
    def load(self) -> float: ...

    @property
    def recent_tokens_per_second(self) -> float: ...

    @property
    def cached_prefixes(self) -> frozenset[int]: ...

    def state(self, now: float, suspect_after_s: float) -> NodeState: ...
