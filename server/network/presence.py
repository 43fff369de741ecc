"""Presence: which node is connected to which network replica, and how it is doing.

Each replica publishes a record per node it owns (its address for forwarded
jobs, the node's name, agent and configuration versions, state, served
models, operator, region, reputation and quarantine reason, a load snapshot
and the conversations it holds in its cache) under a lease: the record counts
until ``expires_at`` and the replica renews it at its heartbeat cadence. A
node that leaves is withdrawn at once; a replica that dies stops renewing and
its records lapse.

Two adapters keep the same contract (tests/component/test_presence_contract.py):
``InProcessPresence`` here, for one replica or several in one process, and
``RedisPresence`` (presence_redis.py) for replicas on several machines.

A node that re-homes to another replica may briefly be claimed by two: the
record of the newer session (``connected_at``) wins, and a replica withdraws
only records it owns.

Every replica renews every record each interval, but few records change in
anything but their lease: readers follow ``changes`` from a cursor and get only
the records that changed, the nodes withdrawn or lapsed, and each replica's
latest lease, so a refresh costs what changed rather than the fleet's size.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Protocol

from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES
from server.network.nodes import NodeState

_PREFIX_BYTES = 8
# Entries the change log keeps beyond twice the live records before it drops
# its oldest (those of nodes long gone, mostly); a reader whose cursor is older
# than what was dropped reads everything again.
LOG_SLACK = 1_000


@dataclass(frozen=True, slots=True)
class NodePresence:
    node_id: str
    replica_id: str
    # Where the owning replica takes forwarded jobs (ReplicaService), HOST:PORT.
    replica_address: str
    state: NodeState
    # Models the node serves (passed validation, or unchecked).
    models: tuple[str, ...]
    region: str
    operator_account_id: str
    reputation: float
    verified: bool
    active_jobs: int
    max_concurrent_jobs: int
    recent_tokens_per_second: float
    # Wall-clock seconds: when the node's session began, when this record was
    # published, and when it lapses.
    connected_at: float
    published_at: float
    expires_at: float
    # The fingerprints the node advertised (core/prompt_prefixes.py), at most
    # MAX_ADVERTISED_PREFIXES. In JSON one base64 string of 8-byte big-endian
    # values: half the size of decimal numbers, and opaque to the store's
    # scripts (Lua reads numbers as doubles).
    cached_prefixes: tuple[int, ...] = ()
    # What the node admin API shows of a node on another replica (a record from
    # a replica that predates them has none of them).
    node_name: str = ""
    quarantine_reason: str = ""
    agent_version: str = ""
    # The network configuration version the agent last acknowledged.
    config_version: int = 0

    def to_json(self) -> str:
        return json.dumps(self._fields(), separators=(",", ":"))

    def content_digest(self) -> str:
        """A digest of every field ``renews`` compares (all but the lease): two records
        of one node with the same digest differ in their lease only."""
        fields = self._fields()
        del fields["published_at"], fields["expires_at"]
        text = json.dumps(fields, separators=(",", ":")).encode()
        return hashlib.blake2b(text, digest_size=16).hexdigest()

    def _fields(self) -> dict[str, object]:
        fields: dict[str, object] = {name: getattr(self, name) for name in _FIELD_NAMES}
        fields["cached_prefixes"] = _pack_prefixes(self.cached_prefixes)
        return fields

    @classmethod
    def from_json(cls, text: str | bytes) -> NodePresence:
        """Raises ValueError, TypeError or KeyError for a malformed record."""
        # Fields a newer replica added are left out: replicas of two versions share
        # presence during a rolling upgrade.
        fields = {name: value for name, value in json.loads(text).items() if name in _FIELDS}
        fields["state"] = NodeState(fields["state"])
        fields["models"] = tuple(fields["models"])
        # A record from a replica that predates the field has none.
        fields["cached_prefixes"] = _unpack_prefixes(fields.get("cached_prefixes", ""))
        return cls(**fields)

    def supersedes(self, other: NodePresence) -> bool:
        """Whether this record may replace ``other`` (same node): its own replica's
        renewal, or a session at least as new."""
        return self.replica_id == other.replica_id or self.connected_at >= other.connected_at

    def renews(self, other: NodePresence) -> bool:
        """Whether this record only renews ``other``'s lease: nothing a reader routes by
        changed, so it is no change for ``Presence.changes``."""
        return replace(other, published_at=self.published_at, expires_at=self.expires_at) == self


_FIELD_NAMES = tuple(each.name for each in dataclass_fields(NodePresence))
_FIELDS = frozenset(_FIELD_NAMES)


def _pack_prefixes(prefixes: tuple[int, ...]) -> str:
    kept = prefixes[:MAX_ADVERTISED_PREFIXES]
    return base64.b64encode(struct.pack(f">{len(kept)}Q", *kept)).decode("ascii")


def _unpack_prefixes(text: str) -> tuple[int, ...]:
    """The first MAX_ADVERTISED_PREFIXES of them, whatever another replica wrote."""
    data = base64.b64decode(text, validate=True)
    if len(data) % _PREFIX_BYTES:
        raise ValueError("cached_prefixes is not a whole number of fingerprints")
    count = min(len(data) // _PREFIX_BYTES, MAX_ADVERTISED_PREFIXES)
    return struct.unpack(f">{count}Q", data[: count * _PREFIX_BYTES])


@dataclass(frozen=True, slots=True)
class PresenceCursor:
    """Where a reader of ``Presence.changes`` stands: opaque to it."""

    # The change log's identity: a log lost and begun again (a store restarted)
    # has another, and its reader must read everything again.
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class ReplicaLease:
    """A replica's latest publish: it renewed the records it carried until ``expires_at``."""

    expires_at: float
    published_at: float


@dataclass(frozen=True, slots=True)
class PresenceChanges:
    cursor: PresenceCursor
    # Whether ``records`` are every live record (the cursor was none, too old, or
    # of a lost log): the reader's nodes missing from them are gone.
    full: bool
    # Live records that changed since the cursor (beyond a renewal, NodePresence.renews).
    records: list[NodePresence]
    # Nodes whose record was withdrawn or lapsed since the cursor (none when full).
    removed: list[str] = field(default_factory=list)
    # Per replica with a live lease. A record renewed without a change lasts until
    # its replica's lease, which it may outlive; a record a replica stopped
    # renewing shows up in ``removed`` once it lapsed.
    leases: dict[str, ReplicaLease] = field(default_factory=dict)


class PresenceUnavailable(Exception):
    """The shared store cannot be reached; the replica keeps serving its own nodes."""


class Presence(Protocol):
    async def publish(self, records: Sequence[NodePresence]) -> None:
        """Stores or renews the records (each until its ``expires_at``); a record of
        another replica's newer session of the same node is kept instead."""

    async def withdraw(self, replica_id: str, node_ids: Sequence[str]) -> None:
        """Removes those nodes' records that ``replica_id`` owns."""

    async def snapshot(self) -> list[NodePresence]:
        """Every record whose lease has not lapsed, of every replica."""

    async def changes(self, since: PresenceCursor | None) -> PresenceChanges:
        """What changed since ``since`` (everything when it is None, too old or of a
        lost log), with the cursor to ask from next time. A change may be reported
        again; none is left out."""

    async def close(self) -> None: ...


class InProcessPresence:
    """Presence in this process's memory: one replica, or replicas sharing one
    instance (tests)."""

    def __init__(self) -> None:
        self._records: dict[str, NodePresence] = {}
        self._leases: dict[str, ReplicaLease] = {}
        # (expires_at, node id) of every stored record, renewals included: the
        # lapsed ones are found without a scan of all records.
        self._expiries: list[tuple[float, str]] = []
        self._log = ChangeLog()

    async def publish(self, records: Sequence[NodePresence]) -> None:
        now = time.time()
        for record in records:
            self._leases[record.replica_id] = ReplicaLease(record.expires_at, record.published_at)
            current = self._live(record.node_id, now)
            if current is not None and not record.supersedes(current):
                continue
            self._records[record.node_id] = record
            heapq.heappush(self._expiries, (record.expires_at, record.node_id))
            if current is None or not record.renews(current):
                self._log.changed(record.node_id)

    async def withdraw(self, replica_id: str, node_ids: Sequence[str]) -> None:
        for node_id in node_ids:
            current = self._records.get(node_id)
            if current is not None and current.replica_id == replica_id:
                del self._records[node_id]
                self._log.changed(node_id)

    async def snapshot(self) -> list[NodePresence]:
        return (await self.changes(None)).records

    async def changes(self, since: PresenceCursor | None) -> PresenceChanges:
        self._lapse(time.time())
        self._log.trim(len(self._records))
        cursor = self._log.cursor()
        leases = dict(self._leases)
        if not self._log.follows(since):
            return PresenceChanges(cursor, True, list(self._records.values()), leases=leases)
        assert since is not None
        changed, removed = [], []
        for node_id in self._log.since(since.seq):
            record = self._records.get(node_id)
            if record is None:
                removed.append(node_id)
            else:
                changed.append(record)
        return PresenceChanges(cursor, False, changed, removed, leases)

    async def close(self) -> None:
        self._records.clear()
        self._leases.clear()
        self._expiries.clear()
        self._log = ChangeLog()

    def _live(self, node_id: str, now: float) -> NodePresence | None:
        record = self._records.get(node_id)
        return record if record is not None and record.expires_at > now else None

    def _lapse(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, node_id = heapq.heappop(self._expiries)
            record = self._records.get(node_id)
            if record is not None and record.expires_at <= now:
                del self._records[node_id]
                self._log.changed(node_id)
        for replica_id in [r for r, lease in self._leases.items() if lease.expires_at <= now]:
            del self._leases[replica_id]


class ChangeLog:
    """Which nodes changed, in order, for InProcessPresence: each node once, at its
    latest change, so a reader walks back from the newest only as far as its cursor."""

    def __init__(self) -> None:
        self._epoch = uuid.uuid4().hex
        self._seq = 0
        # Cursors below this may have missed entries trimmed away.
        self._floor = 0
        self._entries: dict[str, int] = {}  # node id -> seq, oldest first

    def changed(self, node_id: str) -> None:
        self._seq += 1
        self._entries.pop(node_id, None)
        self._entries[node_id] = self._seq

    def cursor(self) -> PresenceCursor:
        return PresenceCursor(self._epoch, self._seq)

    def follows(self, since: PresenceCursor | None) -> bool:
        """Whether every change after ``since`` is still in the log."""
        return since is not None and since.epoch == self._epoch and since.seq >= self._floor

    def since(self, seq: int) -> list[str]:
        changed = []
        for node_id, logged in reversed(self._entries.items()):
            if logged <= seq:
                break
            changed.append(node_id)
        return changed

    def trim(self, live: int) -> None:
        """Drops the oldest entries once gone nodes' entries pile up (LOG_SLACK)."""
        if len(self._entries) <= 2 * live + LOG_SLACK:
            return
        for node_id in list(self._entries)[: len(self._entries) - live]:
            self._floor = self._entries.pop(node_id)
