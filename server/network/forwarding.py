"""Jobs this replica coordinates on nodes another replica owns.

The coordinator keeps the job (its epochs, delivered output, failover and
usage, dispatch.py); the owner runs one assignment on its node and streams the
node's reports back (ReplicaService.RunForwardedJob). The relay here feeds
those reports into the job as if the node were local, under the same fencing:
a report counts only while its epoch is the job's current one. When the owner
gives the assignment up, or cannot be reached, the job moves on like one whose
local node was lost; when the job waited too long in the node's queue, it
fails like a local one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from core.agent_messages import DoneReport, FailedReport
from core.errors import DomainError
from core.inference import Continuation, GenerationSpec
from server.network.jobs import ActiveJob, NodeLost, NodeReport, QueueTimeout
from server.network.remote_nodes import RemoteNode

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Assignment:
    """One assignment of a job to a node, as the owning replica is to run it."""

    job_id: str
    epoch: int
    node_id: str
    spec: GenerationSpec
    continuation: Continuation | None = None


class ReplicaUnavailable(Exception):
    """The owning replica cannot be reached (it died, or the network between)."""


class Forwarder(Protocol):
    def run(self, replica_address: str, assignment: Assignment) -> AsyncGenerator[NodeReport, None]:
        """The node's reports of ``assignment``, through the replica at
        ``replica_address``; ends after a final report (done, failed, lost).
        Raises ReplicaUnavailable, or a DomainError the owner answered with."""
        ...


class ForwardedJobs:
    def __init__(
        self, forwarder: Forwarder, *, unreachable: Callable[[str], None] | None = None
    ) -> None:
        """``unreachable`` is told the id of a replica a relay could not reach."""
        self._forwarder = forwarder
        self._unreachable = unreachable or (lambda replica_id: None)
        self._relays: dict[str, asyncio.Task[None]] = {}

    def start(self, job: ActiveJob, node: RemoteNode, assignment: Assignment) -> None:
        """Runs the job's current assignment on ``node`` through its owner."""
        self.stop(job.job_id)
        node.reserve()
        self._relays[job.job_id] = asyncio.create_task(
            self._relay(job, node, assignment), name="forwarded-job"
        )

    def stop(self, job_id: str) -> None:
        """Ends the job's relay, if any: the owner cancels the assignment on its node."""
        relay = self._relays.pop(job_id, None)
        if relay is not None:
            relay.cancel()

    async def _relay(self, job: ActiveJob, node: RemoteNode, assignment: Assignment) -> None:
        epoch = assignment.epoch
        reason = f"replica {node.replica_id} ended the job's stream"
        stream = self._forwarder.run(node.replica_address, assignment)
        try:
            async with contextlib.aclosing(stream):
                async for report in stream:
                    if not job.accepts(node.node_id, epoch):
                        return
                    now = time.monotonic()
                    job.heard(report, now)
                    if isinstance(report, NodeLost):
                        reason = report.reason
                        break
                    if isinstance(report, QueueTimeout):
                        job.expire(now)
                        return
                    job.post(epoch, report)
                    if isinstance(report, DoneReport | FailedReport):
                        return
        except ReplicaUnavailable as error:
            reason = f"replica {node.replica_id} unreachable"
            log.warning(reason, job_id=job.job_id, node_id=node.node_id, error=str(error))
            self._unreachable(node.replica_id)
        except DomainError as error:
            reason = f"replica {node.replica_id} refused the job: {error.message}"
        finally:
            if self._relays.get(job.job_id) is asyncio.current_task():
                del self._relays[job.job_id]
        if job.accepts(node.node_id, epoch):
            job.give_up(reason)
