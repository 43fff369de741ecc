"""Operator actions on a node (NodeAdminService), wherever in the fleet it is connected.

The replica an operator calls carries an action out itself on a node connected
to it, and on a node connected to no replica (a release clears its stored
quarantine). A node another replica holds (remote_nodes.py) is acted on by
that replica, asked over ReplicaService (``NodeAdmin``): only the session's
holder can stop every replica routing to it (through its presence record) and
put a quarantine into the standing its session shares. The caller shows the
outcome in its view of the node at once; presence carries it to the other
replicas at the holder's next publish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.network.nodes import NodeSession, NodeState
from server.network.remote_nodes import RemoteNode


@dataclass(frozen=True, slots=True)
class Drain:
    """No new jobs for the node; it keeps its session and finishes its jobs."""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Out of service until released, stored before the action returns."""

    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    """Back in service with a fresh reputation."""


NodeAction = Drain | Quarantine | Release


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """Where the node stands on the replica holding it, after an action."""

    # None: not connected to that replica (a release that found it gone).
    state: NodeState | None
    quarantine_reason: str = ""
    reputation: float = 0.0

    @classmethod
    def of(cls, node: NodeSession | None, now: float, suspect_after_s: float) -> ActionOutcome:
        if node is None:
            return cls(None)
        standing = node.standing
        return cls(
            node.state(now, suspect_after_s), standing.quarantine_reason, standing.reputation
        )

    def apply_to(self, node: RemoteNode) -> None:
        """Shows the outcome in this replica's view of the node until its holder's
        next presence record replaces it."""
        if self.state is None:
            return
        node.published_state = self.state
        node.standing.quarantine_reason = self.quarantine_reason
        node.standing.reputation = self.reputation


class NodeAdmin(Protocol):
    async def act(self, replica_address: str, node_id: str, action: NodeAction) -> ActionOutcome:
        """Carries ``action`` out on the node through the replica at
        ``replica_address``, which holds its session. Raises ReplicaUnavailable
        (forwarding.py), or the DomainError that replica answered with."""
        ...
