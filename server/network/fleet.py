"""This network replica's part in a fleet of replicas.

At the agents' heartbeat cadence the replica publishes a presence record for
every node connected to it (presence.py) under a lease of a few intervals,
withdraws the nodes that left, and brings its view of the other replicas'
nodes up to date with what changed since its last refresh (remote_nodes.py),
so routing decisions read memory only. One replica alone publishes to
in-process presence and sees no remote node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from server.network.nodes import NodeSession
from server.network.presence import NodePresence, Presence, PresenceUnavailable
from server.network.remote_nodes import RemoteNodes
from server.network.routing import Router

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    replica_id: str
    # HOST:PORT where other replicas reach this one (its ReplicaService).
    address: str
    # A record's lease, in publish intervals: a replica that died drops out of
    # the others' routing after this many missed renewals.
    lease_intervals: float = 3.0


class Fleet:
    def __init__(
        self,
        settings: ReplicaSettings,
        presence: Presence,
        router: Router,
        nodes: Mapping[str, NodeSession],
        *,
        interval_s: Callable[[], float],
    ) -> None:
        """``nodes`` are this replica's connected nodes; ``interval_s`` the current
        heartbeat interval (the publish cadence)."""
        self.settings = settings
        self._presence = presence
        self._router = router
        self._nodes = nodes
        self._interval_s = interval_s
        self.remote = RemoteNodes(router, settings.replica_id, is_local=nodes.__contains__)
        self._left: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fleet-presence")

    async def stop(self) -> None:
        """Stops publishing and withdraws this replica's records (best effort: they
        lapse with their lease anyway)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        owned = [*self._nodes, *self._left]
        with contextlib.suppress(PresenceUnavailable):
            await self._presence.withdraw(self.settings.replica_id, owned)

    def joined(self, node: NodeSession) -> None:
        """The node is connected here now: it is no longer a remote node."""
        self._left.discard(node.node_id)
        self.remote.forget(node.node_id)

    def left(self, node: NodeSession) -> None:
        """Withdrawn at the next sync, unless it has connected again by then."""
        self._left.add(node.node_id)

    async def sync(self) -> None:
        """Publishes and withdraws this replica's records, then refreshes the view."""
        left = [node_id for node_id in self._left if node_id not in self._nodes]
        if left:
            await self._presence.withdraw(self.settings.replica_id, left)
        self._left.clear()
        await self._presence.publish(self._records())
        self.remote.update(await self._presence.changes(self.remote.cursor))
        if self.remote.cursor is None:  # it wants everything (a replica is back)
            self.remote.update(await self._presence.changes(None))

    def _records(self) -> list[NodePresence]:
        now, wall_now = time.monotonic(), time.time()
        expires_at = wall_now + self._interval_s() * self.settings.lease_intervals
        suspect_after_s = self._router.suspect_after_s
        return [
            NodePresence(
                node_id=node.node_id,
                replica_id=self.settings.replica_id,
                replica_address=self.settings.address,
                state=node.state(now, suspect_after_s),
                models=tuple(sorted(m for m, s in node.model_status.items() if s.serving)),
                region=node.region,
                operator_account_id=node.operator_account_id,
                reputation=node.standing.reputation,
                verified=node.verified,
                active_jobs=len(node.active_jobs),
                max_concurrent_jobs=node.hello.max_concurrent_jobs,
                recent_tokens_per_second=node.recent_tokens_per_second,
                connected_at=node.connected_at.timestamp(),
                published_at=wall_now,
                expires_at=expires_at,
                cached_prefixes=tuple(node.cached_prefixes),
                node_name=node.hello.name,
                quarantine_reason=node.standing.quarantine_reason,
                agent_version=node.hello.agent_version,
                config_version=node.config_version,
            )
            for node in self._nodes.values()
        ]

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except PresenceUnavailable as error:
                # The replica keeps routing over its own nodes and the last view.
                log.warning("presence sync failed", error=str(error))
            await asyncio.sleep(self._interval_s())
