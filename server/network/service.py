"""The network's domain service: node sessions, liveness and job relay.

Pure asyncio: the servicers translate gRPC to these calls and back.

A job survives the loss of its node: when the node's stream ends, its
heartbeats stop, it stalls on the job or it drains out without finishing it,
the job moves to another node under a new epoch as a continuation of what the
caller already received. Reports from a given-up epoch are dropped.

Nodes are verified (validation.py): on join, per offered model, a benchmark
job and the model's known-answer canaries run on the node before the router
may send it that model; in service, a sampled share of dispatched jobs also
sends the node a disguised canary, an ordinary-looking job whose output is
compared with the reference instead of relayed. Canary results move the
node's reputation; below the threshold it is quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import replace
from datetime import UTC, datetime

import structlog

from server.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    InvalidResultSignature,
    JobFailed,
    NoCapacity,
    NotFound,
)
from server.common.inference import (
    CatalogModel,
    GenerationSpec,
    JobAssigned,
    JobEvent,
    JobFinished,
    JobMigrated,
)
from server.common.node_signing import result_payload, verify
from server.network.admission import AdmissionSettings, NodeAdmission
from server.network.catalog import Catalog
from server.network.checks import NodeChecks, Probe
from server.network.config import ConfigModel, NetworkConfig, next_version, version_at_least
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
    ConfigCommand,
    DisconnectCommand,
    ModelStatus,
    ModelValidation,
    NodeCommand,
    NodeHello,
    NodeSession,
    ReconnectCommand,
)
from server.network.routing import Router, RouteRequest
from server.network.settings import FailoverSettings, LivenessSettings, ValidationSettings

__all__ = ["FailoverSettings", "LivenessSettings", "NetworkService", "ValidationSettings"]

log = structlog.get_logger(__name__)


class NetworkService:
    def __init__(
        self,
        catalog: Catalog,
        liveness: LivenessSettings,
        failover: FailoverSettings | None = None,
        admission: NodeAdmission | None = None,
        validation: ValidationSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.admission = admission or NodeAdmission(AdmissionSettings(), None)
        self.validation = validation or ValidationSettings()

        self._catalog = catalog
        self.liveness = liveness
        self.failover = failover or FailoverSettings()
        self._nodes: dict[str, NodeSession] = {}
        self._jobs: dict[str, ActiveJob] = {}
        self._router = Router(suspect_after_s=liveness.suspect_s)
        self._checks = NodeChecks(
            catalog,
            self.validation,
            self._probe,
            serve=lambda node, model: self._router.add(node, (model,)),
            quarantine=self._quarantine,
            rng=rng,
        )
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False
        self._config = NetworkConfig(
            version=1,
            heartbeat_interval_s=liveness.heartbeat_interval_s,
            heartbeat_timeout_s=liveness.heartbeat_timeout_s,
            canary_rate=self.validation.canary_rate if self.validation.enabled else 0.0,
            models=tuple(
                ConfigModel(m.id, m.price, m.context_length, ("llama.cpp",)) for m in catalog
            ),
        )

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="liveness")

    async def stop(self) -> None:
        """Asks every agent to reconnect (to another server, or to this one restarted)."""
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        self._checks.stop()
        for node in list(self._nodes.values()):
            reason = "network server shutting down"
            self._remove(node, reason, ReconnectCommand(reason))

    # --- node sessions ---------------------------------------------------

    def challenge(self) -> bytes:
        """The nonce a new session's hello must be bound to."""
        return self.admission.challenge()

    async def register(
        self, hello: NodeHello, raw_hello: bytes, signature: bytes, session_nonce: bytes
    ) -> NodeSession:
        """Admits the node (signature, challenge, clock window, token), then registers it.

        A node whose previous session is still registered (same key) replaces it.
        """
        admitted = await self.admission.admit(hello, raw_hello, signature, session_nonce)
        if not version_at_least(hello.agent_version, self._config.min_agent_version):
            raise FailedPrecondition(
                f"agent version {hello.agent_version or '?'} is older than the network's "
                f"minimum {self._config.min_agent_version}; upgrade the agent"
            )
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
        previous = self._nodes.get(admitted.node_id)
        if previous is not None:
            self.disconnect(previous, "replaced by a new session of the same node")
        node = NodeSession(
            node_id=admitted.node_id,
            hello=replace(hello, models=served, node_token=""),
            operator_account_id=admitted.operator_account_id,
        )
        self._nodes[node.node_id] = node
        node.outbox.put_nowait(ConfigCommand(self._config))
        if self.validation.enabled:
            self._checks.validate(node)
        else:
            for model in node.models:
                node.model_status[model] = ModelStatus(ModelValidation.UNCHECKED)
            self._router.add(node)
        log.info(
            "node registered",
            node_id=node.node_id,
            name=hello.name,
            models=sorted(node.models),
            operator_account_id=node.operator_account_id,
        )
        return node

    def heartbeat(
        self,
        node: NodeSession,
        *,
        active: int,
        queued: int,
        tokens_per_second: float,
        free_memory_bytes: int = 0,
    ) -> None:
        node.touch()
        node.last_heartbeat_at = datetime.now(UTC)
        node.queued_jobs = queued
        node.recent_tokens_per_second = tokens_per_second
        node.free_memory_bytes = free_memory_bytes

    def draining(self, node: NodeSession) -> None:
        """The node takes no new jobs; it finishes its own and then closes."""
        node.touch()
        if not node.draining:
            node.draining = True
            log.info("node draining", node_id=node.node_id, jobs=len(node.active_jobs))

    # --- admin and configuration -------------------------------------------

    def drain_node(self, node_id: str) -> NodeSession:
        """No new jobs for the node; it keeps its session and finishes its jobs."""
        node = self.node(node_id)
        self.draining(node)
        return node

    def _quarantine(self, node: NodeSession, reason: str) -> None:
        if node.node_id in self._nodes:
            self.quarantine(node.node_id, reason)

    def quarantine(self, node_id: str, reason: str) -> NodeSession:
        """Takes the node out of service until it reconnects."""
        node = self.node(node_id)
        if not node.quarantine_reason:
            node.quarantine_reason = reason or "quarantined by an operator"
            log.warning("node quarantined", node_id=node_id, reason=node.quarantine_reason)
        return node

    @property
    def config(self) -> NetworkConfig:
        return self._config

    def update_config(self, proposed: NetworkConfig, expected_version: int) -> NetworkConfig:
        """Stores the next version and pushes it to every connected agent."""
        self._config = next_version(self._config, proposed, expected_version)
        for node in self._nodes.values():
            node.outbox.put_nowait(ConfigCommand(self._config))
        log.info("network configuration updated", version=self._config.version)
        return self._config

    def config_applied(self, node: NodeSession, version: int) -> None:
        node.touch()
        node.config_version = max(node.config_version, version)

    def report(self, node: NodeSession, job_id: str, epoch: int, report: NodeReport) -> None:
        """Routes a node's report to its job, dropping reports the node does not own."""
        node.touch()
        job = self._jobs.get(job_id)
        if job is None or not job.accepts(node.node_id, epoch):
            log.info("stale job report dropped", node_id=node.node_id, job_id=job_id, epoch=epoch)
            return
        job.last_progress = time.monotonic()
        if isinstance(report, ChunkReport):
            job.output(epoch).add(report.text, report.token_ids)
        elif isinstance(report, DoneReport | FailedReport):
            usage = report.usage
            payload = result_payload(
                job_id=job_id,
                epoch=epoch,
                done=isinstance(report, DoneReport),
                reason=report.reason_code,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                output=job.output(epoch),
            )
            if not verify(node.hello.public_key, report.signature, payload):
                self.cut_off(
                    node,
                    InvalidResultSignature(
                        f"the result of job {job_id} (epoch {epoch}) is not signed by this "
                        "node over what it streamed",
                        metadata={"job_id": job_id, "epoch": str(epoch)},
                    ),
                )
                return
        job.post(epoch, report)

    def disconnect(self, node: NodeSession, reason: str) -> None:
        """Forgets the node at once and moves its jobs elsewhere; idempotent."""
        self._remove(node, reason, DisconnectCommand(reason))

    def cut_off(self, node: NodeSession, error: DomainError) -> None:
        """Ends the node's session with ``error``; its jobs move elsewhere, unpaid."""
        log.warning("node cut off", node_id=node.node_id, reason=error.reason, error=error.message)
        self._remove(node, error.message, DisconnectCommand(error.message, error))

    def _remove(self, node: NodeSession, reason: str, farewell: NodeCommand) -> None:
        if self._nodes.pop(node.node_id, None) is None:
            return
        self._router.remove(node)
        for job_id in list(node.active_jobs):
            job = self._jobs.get(job_id)
            if job is not None and job.node_id == node.node_id:
                job.give_up(reason)
        node.outbox.put_nowait(farewell)
        log.info("node removed", node_id=node.node_id, reason=reason)

    async def _watch(self) -> None:
        """Removes silent nodes and gives up stalled assignments."""
        liveness, failover = self.liveness, self.failover
        interval = (
            min(
                liveness.heartbeat_interval_s,
                liveness.heartbeat_timeout_s,
                liveness.suspect_s,
                failover.stall_timeout_s,
            )
            / 2
        )
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            dead_before = now - liveness.heartbeat_timeout_s
            for node in list(self._nodes.values()):
                if node.last_seen < dead_before:
                    self.disconnect(node, "heartbeat timeout")
            stalled_before = now - failover.stall_timeout_s
            for job in list(self._jobs.values()):
                if job.last_progress < stalled_before:
                    job.give_up(f"no output for {failover.stall_timeout_s:g} s")

    def nodes(self) -> list[NodeSession]:
        return list(self._nodes.values())

    def node(self, node_id: str) -> NodeSession:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not connected")
        return node

    # --- catalog and dispatch ---------------------------------------------

    def models(self) -> list[CatalogModel]:
        return [replace(model, ready_nodes=self._router.count(model.id)) for model in self._catalog]

    async def run_job(self, job_id: str, spec: GenerationSpec) -> AsyncGenerator[JobEvent, None]:
        """Runs the job, moving it to another node if its node is lost; yields its events.

        Closing the iterator early (caller cancelled) cancels the job on the node.
        """
        catalog_model = self._catalog.get(spec.model)
        if job_id in self._jobs:
            raise InvalidArgument(f"job {job_id} is already running", field="job_id")
        if spec.max_prompt_tokens > catalog_model.context_length:
            raise InvalidArgument(
                "max_prompt_tokens exceeds the context", field="max_prompt_tokens"
            )
        node = self._router.pick(RouteRequest(spec.model), time.monotonic())
        if node is None or self._closing:
            raise NoCapacity(f"no node is serving the model '{spec.model}' right now")

        job = ActiveJob(
            job_id=job_id,
            spec=spec,
            node_id=node.node_id,
            operator_account_id=node.operator_account_id,
        )
        self._jobs[job_id] = job
        self._assign(job, node)
        bound = log.bind(job_id=job_id)
        bound.info("job assigned", node_id=node.node_id, model=spec.model)
        self._checks.maybe_canary(node, spec.model, self._config.canary_rate)
        finished = False
        try:
            yield JobAssigned(node.node_id)
            while True:
                epoch, report = await job.reports.get()
                if epoch != job.epoch:
                    continue  # queued before the job moved on
                if isinstance(report, ChunkReport):
                    yield job.record(report)
                elif isinstance(report, DoneReport):
                    finished = True
                    job.verified()
                    # Completion tokens are what was relayed, not what the node claims.
                    usage = job.usage(report.usage.prompt_tokens)
                    if (
                        report.usage.completion_tokens
                        != job.node_usage()[-1].usage.completion_tokens
                    ):
                        bound.warning(
                            "node usage differs from relayed tokens",
                            node_id=job.node_id,
                            claimed=report.usage.completion_tokens,
                            relayed=job.node_usage()[-1].usage.completion_tokens,
                        )
                    yield JobFinished(report.finish_reason, usage, job.node_usage())
                    return
                elif isinstance(report, FailedReport):
                    finished = True
                    raise _failure_error(report)
                else:
                    moved = self._migrate(job, report, bound)
                    if moved is None:
                        finished = True
                        raise JobFailed(f"node lost mid-job: {report.reason}")
                    yield JobMigrated(moved.node_id, job.epoch, report.reason)
        finally:
            self._jobs.pop(job_id, None)
            current = self._nodes.get(job.node_id)
            if current is not None:
                current.active_jobs.discard(job_id)
                if not finished:
                    current.outbox.put_nowait(CancelCommand(job_id, job.epoch))
                    bound.info("job cancelled by caller", node_id=job.node_id)

    def _assign(self, job: ActiveJob, node: NodeSession) -> None:
        continuation = job.continuation() if job.migrations else None
        spec = job.remaining_spec() if job.migrations else job.spec
        node.active_jobs.add(job.job_id)
        job.last_progress = time.monotonic()
        node.outbox.put_nowait(AssignCommand(job.job_id, job.epoch, spec, continuation))

    def _migrate(
        self, job: ActiveJob, lost: NodeLost, bound: structlog.typing.FilteringBoundLogger
    ) -> NodeSession | None:
        """Moves ``job`` off its lost node; returns the new node, or None if it cannot."""
        old = self._nodes.get(job.node_id)
        if old is not None:
            # Stalled or partitioned, not gone: stop it working on the job.
            old.active_jobs.discard(job.job_id)
            old.outbox.put_nowait(CancelCommand(job.job_id, job.epoch))
        if self._closing or job.migrations >= self.failover.max_migrations:
            bound.warning(
                "job lost its node and cannot move", reason=lost.reason, migrations=job.migrations
            )
            return None
        node = self._router.pick(
            RouteRequest(job.spec.model, exclude=frozenset(job.tried)), time.monotonic()
        )
        if node is None:
            bound.warning("job lost its node and no other can continue it", reason=lost.reason)
            return None
        previous = job.node_id
        job.reassign(node.node_id, node.operator_account_id)
        self._assign(job, node)
        bound.info(
            "job migrated",
            from_node=previous,
            node_id=node.node_id,
            epoch=job.epoch,
            delivered_tokens=job.delivered_tokens,
            reason=lost.reason,
        )
        return node

    # --- validation and canaries ---------------------------------------------

    async def _probe(self, node: NodeSession, spec: GenerationSpec) -> Probe | None:
        """Runs ``spec`` on ``node`` as an ordinary job, keeping its output to itself.

        None when the assignment was given up (node lost, stalled or cut off).
        """
        job_id = uuid.uuid4().hex
        job = ActiveJob(
            job_id=job_id,
            spec=spec,
            node_id=node.node_id,
            operator_account_id=node.operator_account_id,
        )
        self._jobs[job_id] = job
        assigned_at = time.monotonic()
        self._assign(job, node)
        texts: list[str] = []
        tokens = 0
        first_token_at = 0.0
        finished = False
        try:
            while True:
                _, report = await job.reports.get()
                if isinstance(report, ChunkReport):
                    if not texts:
                        first_token_at = time.monotonic()
                    texts.append(report.text)
                    tokens += report.token_count
                elif isinstance(report, DoneReport | FailedReport):
                    done_at = time.monotonic()
                    finished = True
                    return Probe(
                        done=isinstance(report, DoneReport),
                        text="".join(texts),
                        tokens=tokens,
                        assigned_at=assigned_at,
                        first_token_at=first_token_at or done_at,
                        done_at=done_at,
                    )
                else:
                    finished = True
                    return None
        finally:
            self._jobs.pop(job_id, None)
            node.active_jobs.discard(job_id)
            if not finished and node.node_id in self._nodes:
                node.outbox.put_nowait(CancelCommand(job_id, job.epoch))


def _failure_error(report: FailedReport) -> Exception:
    if report.kind is FailureKind.INVALID_REQUEST:
        return InvalidArgument(report.message, field="messages")
    if report.kind is FailureKind.MODEL_UNAVAILABLE:
        return NoCapacity(report.message)
    return JobFailed(report.message)
