"""Choosing the node for a job.

Eligibility filters first, then the least loaded node wins; ties go to the
node that has waited longest since it was last given a job, so equal nodes
share work round-robin.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.network.nodes import NodeSession


def eligible(nodes: Iterable[NodeSession], model: str) -> list[NodeSession]:
    return [node for node in nodes if model in node.models]


def pick_node(candidates: list[NodeSession], last_assigned: dict[str, int]) -> NodeSession | None:
    """The least loaded candidate; ``last_assigned`` maps node id to a sequence number."""
    if not candidates:
        return None
    return min(candidates, key=lambda node: (node.load, last_assigned.get(node.node_id, -1)))
