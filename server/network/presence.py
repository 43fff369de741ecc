"""Presence: which node is connected to which network replica, and how it is doing.

Each replica publishes a record per node it owns (its address for forwarded
jobs, the node's state, served models, operator, region, reputation, a load
snapshot and the conversations it holds in its cache) under a lease: the
record counts until ``expires_at`` and the replica renews it at its heartbeat
cadence. A node that leaves is withdrawn at once; a replica that dies stops
renewing and its records lapse.

Two adapters keep the same contract (tests/unit/test_presence_contract.py):
``InProcessPresence`` here, for one replica or several in one process, and
``RedisPresence`` (presence_redis.py) for replicas on several machines.

A node that re-homes to another replica may briefly be claimed by two: the
record of the newer session (``connected_at``) wins, and a replica withdraws
only records it owns.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES
from server.network.nodes import NodeState

_PREFIX_BYTES = 8


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

    def to_json(self) -> str:
        fields = asdict(self)
        fields["cached_prefixes"] = _pack_prefixes(self.cached_prefixes)
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> NodePresence:
        """Raises ValueError, TypeError or KeyError for a malformed record."""
        fields = json.loads(text)
        fields["state"] = NodeState(fields["state"])
        fields["models"] = tuple(fields["models"])
        # A record from a replica that predates the field has none.
        fields["cached_prefixes"] = _unpack_prefixes(fields.get("cached_prefixes", ""))
        return cls(**fields)

    def supersedes(self, other: NodePresence) -> bool:
        """Whether this record may replace ``other`` (same node): its own replica's
        renewal, or a session at least as new."""
        return self.replica_id == other.replica_id or self.connected_at >= other.connected_at


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

    async def close(self) -> None: ...


class InProcessPresence:
    """Presence in this process's memory: one replica, or replicas sharing one
    instance (tests)."""

    def __init__(self) -> None:
        self._records: dict[str, NodePresence] = {}

    async def publish(self, records: Sequence[NodePresence]) -> None:
        for record in records:
            current = self._live(record.node_id, time.time())
            if current is None or record.supersedes(current):
                self._records[record.node_id] = record

    async def withdraw(self, replica_id: str, node_ids: Sequence[str]) -> None:
        for node_id in node_ids:
            current = self._records.get(node_id)
            if current is not None and current.replica_id == replica_id:
                del self._records[node_id]

    async def snapshot(self) -> list[NodePresence]:
        now = time.time()
        for node_id in [n for n, r in self._records.items() if r.expires_at <= now]:
            del self._records[node_id]
        return list(self._records.values())

    async def close(self) -> None:
        self._records.clear()

    def _live(self, node_id: str, now: float) -> NodePresence | None:
        record = self._records.get(node_id)
        return record if record is not None and record.expires_at > now else None
