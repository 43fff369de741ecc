"""The nodes other network replicas own, as this replica's router sees them.

The view follows presence's changes at the heartbeat cadence (fleet.py): a
refresh touches only the nodes whose record changed, was withdrawn or lapsed,
and renews every node's lease through its replica's. It is never read from the
shared store on a routing decision: remote nodes sit in the same router index
as local sessions. Their load is the owner's last snapshot, plus the jobs this
replica sent them since, so a burst does not pile onto one remote node between
snapshots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from server.network.advertised import AdvertisesPrefixes, PrefixListener
from server.network.nodes import NodeStanding, NodeState
from server.network.presence import (
    NodePresence,
    PresenceChanges,
    PresenceCursor,
    ReplicaLease,
)
from server.network.routing import Router

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class Lease:
    """A replica's latest lease as a monotonic deadline, shared by its nodes: a
    renewal that changes nothing else reaches them all at once."""

    deadline: float = 0.0


@dataclass(eq=False, slots=True)
class RemoteNode(AdvertisesPrefixes):
    node_id: str
    node_name: str
    agent_version: str
    config_version: int
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
    connected_at: float
    # Monotonic time the record's own lease lapses, and its replica's latest
    # lease: not routed to once both lapsed.
    lease_deadline: float
    replica_lease: Lease
    # As the record advertised them (``cached_prefixes``).
    _advertised: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    prefix_listeners: list[PrefixListener] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def from_record(
        cls, record: NodePresence, now: float, wall_now: float, lease: Lease | None = None
    ) -> RemoteNode:
        """``lease``: its replica's, shared with its other nodes (else its own lease alone)."""
        lease = Lease() if lease is None else lease
        node = cls(
            node_id=record.node_id,
            node_name=record.node_name,
            agent_version=record.agent_version,
            config_version=record.config_version,
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
            connected_at=record.connected_at,
            lease_deadline=0.0,
            replica_lease=lease,
        )
        node.refresh(record, lease, now, wall_now)
        return node

    def same_place(self, record: NodePresence) -> bool:
        """Whether ``record`` keeps the node's index keys and owner (else re-index it)."""
        return (
            record.replica_id == self.replica_id
            and record.connected_at == self.connected_at
            and frozenset(record.models) == self.models
        )

    def refresh(self, record: NodePresence, lease: Lease, now: float, wall_now: float) -> None:
        self.replica_lease = lease
        self.replica_address = record.replica_address
        self.standing.reputation = record.reputation
        self.standing.quarantine_reason = record.quarantine_reason
        self.config_version = record.config_version
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
        if now >= self.lease_deadline and now >= self.replica_lease.deadline:
            return NodeState.SUSPECT
        return self.published_state


class RemoteNodes:
    """Keeps the router's remote entries equal to the records presence holds."""

    def __init__(self, router: Router, replica_id: str, is_local: Callable[[str], bool]) -> None:
        self._router = router
        self._replica_id = replica_id
        self._is_local = is_local
        self._nodes: dict[str, RemoteNode] = {}
        self._leases: dict[str, Lease] = {}
        # Replicas a forwarded job could not reach, with the wall time that
        # happened: their nodes are left out until they publish again.
        self._unreachable: dict[str, float] = {}
        # Where the view stands in presence's changes; None: it reads everything next.
        self.cursor: PresenceCursor | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> RemoteNode | None:
        return self._nodes.get(node_id)

    def nodes(self) -> list[RemoteNode]:
        return list(self._nodes.values())

    def update(self, changes: PresenceChanges) -> None:
        """Applies what changed since ``cursor``. A replica found unreachable that has
        published again leaves ``cursor`` None: its nodes, dropped, are read anew."""
        back = [
            replica_id
            for replica_id, since in self._unreachable.items()
            if (lease := changes.leases.get(replica_id)) is not None and lease.published_at > since
        ]
        if back and not changes.full:
            self.cursor = None
            return
        now, wall_now = time.monotonic(), time.time()
        self._renew(changes.leases, now, wall_now)
        if changes.full:
            self._apply(changes.records, now, wall_now)
        else:
            for node_id in changes.removed:
                self.forget(node_id)
            for record in changes.records:
                if self._foreign(record) and self._admitted(record):
                    self._take(record, now, wall_now)
                else:
                    self.forget(record.node_id)
            # A replica whose lease lapsed has gone for good.
            for replica_id in self._unreachable.keys() - changes.leases.keys():
                del self._unreachable[replica_id]
        self.cursor = changes.cursor

    def apply(self, records: Iterable[NodePresence]) -> None:
        """Makes the view the snapshot ``records``, each node until its own lease."""
        self._apply(records, time.monotonic(), time.time())

    def forget(self, node_id: str) -> None:
        """The node is connected here now, or its record is gone."""
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

    def _apply(self, records: Iterable[NodePresence], now: float, wall_now: float) -> None:
        seen: set[str] = set()
        publishing: set[str] = set()
        for record in records:
            if not self._foreign(record):
                continue
            publishing.add(record.replica_id)
            if self._admitted(record):
                seen.add(record.node_id)
                self._take(record, now, wall_now)
        for node_id in self._nodes.keys() - seen:
            self.forget(node_id)
        # A replica none of whose records is left has gone for good.
        for replica_id in self._unreachable.keys() - publishing:
            del self._unreachable[replica_id]

    def _foreign(self, record: NodePresence) -> bool:
        """Whether the record is of another replica's node (not one connected here)."""
        return record.replica_id != self._replica_id and not self._is_local(record.node_id)

    def _admitted(self, record: NodePresence) -> bool:
        """False for a record its replica published before it was found unreachable."""
        since = self._unreachable.get(record.replica_id)
        if since is None:
            return True
        if record.published_at <= since:
            return False
        del self._unreachable[record.replica_id]
        log.info("replica reachable again", replica_id=record.replica_id)
        return True

    def _take(self, record: NodePresence, now: float, wall_now: float) -> None:
        lease = self._leases.get(record.replica_id)
        if lease is None:
            lease = self._leases[record.replica_id] = Lease()
        current = self._nodes.get(record.node_id)
        if current is not None and current.same_place(record):
            current.refresh(record, lease, now, wall_now)
            return
        if current is not None:
            self._router.remove(current)
        node = RemoteNode.from_record(record, now, wall_now, lease)
        self._nodes[node.node_id] = node
        self._router.add(node)

    def _renew(self, leases: dict[str, ReplicaLease], now: float, wall_now: float) -> None:
        """Moves each replica's shared deadline to its latest lease; a replica whose
        lease lapsed is dropped, its nodes keep the deadline that lapsed."""
        renewed: dict[str, Lease] = {}
        for replica_id, lease in leases.items():
            holder = self._leases.get(replica_id)
            if holder is None:
                holder = Lease()
            holder.deadline = now + (lease.expires_at - wall_now)
            renewed[replica_id] = holder
        self._leases = renewed
