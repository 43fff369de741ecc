"""The nodes other network replicas own, as this replica's router sees them.

The view is rebuilt from presence snapshots at the heartbeat cadence (fleet.py),
never read from the shared store on a routing decision: remote nodes sit in the
same router index as local sessions. Their load is the owner's last snapshot,
plus the jobs this replica sent them since, so a burst does not pile onto one
remote node between snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from server.network.nodes import NodeStanding, NodeState
from server.network.presence import NodePresence
from server.network.routing import Router

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class RemoteNode:
    node_id: str
    replica_id: str
    replica_address: str
    models: frozenset[str]
    region: str
    operator_account_id: str
    standing: NodeStanding
    verified: bool
    published_state: NodeState
    active_jobs: int
    max_concurrent_jobs: int
    recent_tokens_per_second: float
    cached_prefixes: frozenset[int]
    connected_at: float
    # Monotonic time the record's lease lapses: not routed to after that.
    lease_deadline: float

    @classmethod
    def from_record(cls, record: NodePresence, now: float, wall_now: float) -> RemoteNode:
        node = cls(
            node_id=record.node_id,
            replica_id=record.replica_id,
            replica_address=record.replica_address,
            models=frozenset(record.models),
            region=record.region,
            operator_account_id=record.operator_account_id,
            standing=NodeStanding(),
            verified=False,
            published_state=record.state,
            active_jobs=0,
            max_concurrent_jobs=1,
            recent_tokens_per_second=0.0,
            cached_prefixes=frozenset(),
            connected_at=record.connected_at,
            lease_deadline=0.0,
        )
        node.refresh(record, now, wall_now)
        return node

    def same_place(self, record: NodePresence) -> bool:
        """Whether ``record`` keeps the node's index keys and owner (else re-index it)."""
        return (
            record.replica_id == self.replica_id
            and record.connected_at == self.connected_at
            and frozenset(record.models) == self.models
        )

    def refresh(self, record: NodePresence, now: float, wall_now: float) -> None:
        self.replica_address = record.replica_address
        self.standing.reputation = record.reputation
        self.verified = record.verified
        self.published_state = record.state
        self.active_jobs = record.active_jobs
        self.max_concurrent_jobs = record.max_concurrent_jobs
        self.recent_tokens_per_second = record.recent_tokens_per_second
        self.cached_prefixes = frozenset(record.cached_prefixes)
        self.lease_deadline = now + (record.expires_at - wall_now)

    def reserve(self) -> None:
        """A job was sent to the node; the owner's next snapshot counts it."""
        self.active_jobs += 1

    @property
    def load(self) -> float:
        return self.active_jobs / max(1, self.max_concurrent_jobs)

    def state(self, now: float, suspect_after_s: float) -> NodeState:
        """As its owner published it; suspect once its lease lapsed."""
        if now >= self.lease_deadline:
            return NodeState.SUSPECT
        return self.published_state


class RemoteNodes:
    """Keeps the router's remote entries equal to the latest presence snapshot."""

    def __init__(self, router: Router, replica_id: str, is_local: Callable[[str], bool]) -> None:
        self._router = router
        self._replica_id = replica_id
        self._is_local = is_local
        self._nodes: dict[str, RemoteNode] = {}
        # Replicas a forwarded job could not reach, with the wall time that
        # happened: their nodes are left out until they publish again.
        self._unreachable: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> RemoteNode | None:
        return self._nodes.get(node_id)

    def apply(self, records: Iterable[NodePresence]) -> None:
        now, wall_now = time.monotonic(), time.time()
        seen: set[str] = set()
        publishing: set[str] = set()
        for record in records:
            if record.replica_id == self._replica_id or self._is_local(record.node_id):
                continue
            publishing.add(record.replica_id)
            since = self._unreachable.get(record.replica_id)
            if since is not None:
                if record.published_at <= since:
                    continue
                del self._unreachable[record.replica_id]
                log.info("replica reachable again", replica_id=record.replica_id)
            seen.add(record.node_id)
            current = self._nodes.get(record.node_id)
            if current is not None and current.same_place(record):
                current.refresh(record, now, wall_now)
                continue
            if current is not None:
                self._router.remove(current)
            node = RemoteNode.from_record(record, now, wall_now)
            self._nodes[node.node_id] = node
            self._router.add(node)
        for node_id in self._nodes.keys() - seen:
            self._router.remove(self._nodes.pop(node_id))
        # A replica none of whose records is left has gone for good.
        for replica_id in self._unreachable.keys() - publishing:
            del self._unreachable[replica_id]

    def forget(self, node_id: str) -> None:
        """The node is connected here now."""
        node = self._nodes.pop(node_id, None)
        if node is not None:
            self._router.remove(node)

    def unreachable(self, replica_id: str) -> None:
        """A forwarded job could not reach the replica: stop routing to its nodes."""
        if replica_id in self._unreachable:
            return
        self._unreachable[replica_id] = time.time()
        gone = [node for node in self._nodes.values() if node.replica_id == replica_id]
        for node in gone:
            self.forget(node.node_id)
        log.warning("replica unreachable", replica_id=replica_id, nodes=len(gone))
