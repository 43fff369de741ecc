"""The network's domain service: node sessions, liveness and job relay.

Pure asyncio: the servicers translate gRPC to these calls and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import structlog

from server.common.errors import (
    InvalidArgument,
    JobFailed,
    NoCapacity,
    NotFound,
)
from server.common.inference import (
    CatalogModel,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobFinished,
    Usage,
)
from server.network.catalog import Catalog
from server.network.jobs import (
    ActiveJob,
    ChunkReport,
    DoneReport,
    FailedReport,
    FailureKind,
    NodeLost,
    NodeReport,
)
from server.network.nodes import (
    AssignCommand,
    CancelCommand,
    DisconnectCommand,
    NodeHello,
    NodeSession,
)
from server.network.routing import eligible, pick_node

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class LivenessSettings:
    heartbeat_interval_s: float = 5.0
    # A node silent for this long is dropped and its jobs fail.
    heartbeat_timeout_s: float = 30.0


class NetworkService:
    def __init__(self, catalog: Catalog, liveness: LivenessSettings) -> None:
        self._catalog = catalog
        self.liveness = liveness
        self._nodes: dict[str, NodeSession] = {}
        self._jobs: dict[str, ActiveJob] = {}
        self._assign_seq = itertools.count()
        self._last_assigned: dict[str, int] = {}
        self._monitor: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._monitor = asyncio.create_task(self._expire_silent_nodes(), name="liveness")

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for node in list(self._nodes.values()):
            self.disconnect(node, "network server shutting down")

    # --- node sessions ---------------------------------------------------

    def register(self, hello: NodeHello) -> NodeSession:
        if hello.max_concurrent_jobs < 1:
            raise InvalidArgument(
                "max_concurrent_jobs must be at least 1", field="max_concurrent_jobs"
            )
        served = tuple(model for model in hello.models if model.model in self._catalog)
        if not served:
            offered = ", ".join(model.model for model in hello.models) or "nothing"
            raise InvalidArgument(
                f"node offers no catalog model (offers {offered})", field="models"
            )
        node = NodeSession(node_id=uuid.uuid4().hex, hello=replace(hello, models=served))
        self._nodes[node.node_id] = node
        log.info(
            "node registered", node_id=node.node_id, name=hello.name, models=sorted(node.models)
        )
        return node

    def heartbeat(
        self, node: NodeSession, *, active: int, queued: int, tokens_per_second: float
    ) -> None:
        node.touch()
        node.last_heartbeat_at = datetime.now(UTC)
        node.queued_jobs = queued
        node.recent_tokens_per_second = tokens_per_second

    def report(self, node: NodeSession, job_id: str, epoch: int, report: NodeReport) -> None:
        """Routes a node's report to its job, dropping reports the node does not own."""
        node.touch()
        job = self._jobs.get(job_id)
        if job is None or not job.accepts(node.node_id, epoch):
            log.info("stale job report dropped", node_id=node.node_id, job_id=job_id, epoch=epoch)
            return
        job.reports.put_nowait(report)

    def disconnect(self, node: NodeSession, reason: str) -> None:
        """Forgets the node at once and fails its jobs; idempotent."""
        if self._nodes.pop(node.node_id, None) is None:
            return
        self._last_assigned.pop(node.node_id, None)
        for job_id in list(node.active_jobs):
            job = self._jobs.get(job_id)
            if job is not None and job.node_id == node.node_id:
                job.reports.put_nowait(NodeLost(reason))
        node.outbox.put_nowait(DisconnectCommand(reason))
        log.info("node removed", node_id=node.node_id, reason=reason)

    async def _expire_silent_nodes(self) -> None:
        interval = min(self.liveness.heartbeat_interval_s, self.liveness.heartbeat_timeout_s) / 2
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.liveness.heartbeat_timeout_s
            for node in list(self._nodes.values()):
                if node.last_seen < deadline:
                    self.disconnect(node, "heartbeat timeout")

    def nodes(self) -> list[NodeSession]:
        return list(self._nodes.values())

    def node(self, node_id: str) -> NodeSession:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not connected")
        return node

    # --- catalog and dispatch ---------------------------------------------

    def models(self) -> list[CatalogModel]:
        counts = {model.id: 0 for model in self._catalog}
        for node in self._nodes.values():
            for model in node.models:
                counts[model] = counts.get(model, 0) + 1
        return [replace(model, ready_nodes=counts[model.id]) for model in self._catalog]

    async def run_job(self, job_id: str, spec: GenerationSpec) -> AsyncGenerator[JobEvent, None]:
        """Runs the job on the best node and yields its events.

        Closing the iterator early (caller cancelled) cancels the job on the node.
        """
        catalog_model = self._catalog.get(spec.model)
        if job_id in self._jobs:
            raise InvalidArgument(f"job {job_id} is already running", field="job_id")
        if spec.max_prompt_tokens > catalog_model.context_length:
            raise InvalidArgument(
                "max_prompt_tokens exceeds the context", field="max_prompt_tokens"
            )
        node = pick_node(eligible(self._nodes.values(), spec.model), self._last_assigned)
        if node is None:
            raise NoCapacity(f"no node is serving the model '{spec.model}' right now")

        job = ActiveJob(job_id=job_id, epoch=1, node_id=node.node_id, reports=asyncio.Queue())
        self._jobs[job_id] = job
        node.active_jobs.add(job_id)
        self._last_assigned[node.node_id] = next(self._assign_seq)
        node.outbox.put_nowait(AssignCommand(job_id, job.epoch, spec))
        bound = structlog.get_logger(__name__).bind(job_id=job_id, node_id=node.node_id)
        bound.info("job assigned", model=spec.model)
        finished = False
        try:
            yield JobAssigned(node.node_id)
            delivered = 0
            prompt_tokens = 0
            while True:
                report = await job.reports.get()
                if isinstance(report, ChunkReport):
                    delivered += report.token_count
                    prompt_tokens = report.prompt_tokens or prompt_tokens
                    yield JobDelta(report.text, report.token_count, report.prompt_tokens)
                elif isinstance(report, DoneReport):
                    finished = True
                    # Completion tokens are what was relayed, not what the node claims.
                    usage = Usage(report.usage.prompt_tokens or prompt_tokens, delivered)
                    if report.usage.completion_tokens != delivered:
                        bound.warning(
                            "node usage differs from relayed tokens",
                            claimed=report.usage.completion_tokens,
                            relayed=delivered,
                        )
                    yield JobFinished(report.finish_reason, usage)
                    return
                elif isinstance(report, FailedReport):
                    finished = True
                    raise _failure_error(report)
                else:
                    finished = True
                    raise JobFailed(f"node lost mid-job: {report.reason}")
        finally:
            self._jobs.pop(job_id, None)
            node.active_jobs.discard(job_id)
            if not finished and node.node_id in self._nodes:
                node.outbox.put_nowait(CancelCommand(job_id, job.epoch))
                bound.info("job cancelled by caller")


def _failure_error(report: FailedReport) -> Exception:
    if report.kind is FailureKind.INVALID_REQUEST:
        return InvalidArgument(report.message, field="messages")
    if report.kind is FailureKind.MODEL_UNAVAILABLE:
        return NoCapacity(report.message)
    return JobFailed(report.message)
