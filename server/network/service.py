"""The network's domain service: node sessions, liveness, configuration, and
the jobs they run (dispatch.py).

Pure asyncio: the servicers translate gRPC to these calls and back.

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
from collections.abc import AsyncGenerator
from dataclasses import replace
from datetime import UTC, datetime

import structlog

from core.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NodeQuarantined,
    NotFound,
)
from core.inference import (
    CatalogModel,
    GenerationSpec,
    JobEvent,
    NodeRequirements,
)
from core.regions import validate_region
from server.network.admission import AdmissionSettings, NodeAdmission
from server.network.catalog import Catalog
from server.network.checks import NodeChecks
from server.network.config import (
    OLDEST_COMPATIBLE_AGENT,
    ConfigModel,
    NetworkConfig,
    next_version,
    version_at_least,
)
from server.network.dispatch import JobDispatch
from server.network.jobs import (
    NodeReport,
)
from server.network.nodes import (
    ConfigCommand,
    DisconnectCommand,
    ModelStatus,
    ModelValidation,
    NodeCommand,
    NodeHello,
    NodeSession,
    NodeStanding,
    ReconnectCommand,
)
from server.network.routing import NO_REQUIREMENTS, Router
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
        # Every admitted node's standing, connected or not (nodes.NodeStanding).
        self._standings: dict[str, NodeStanding] = {}
        self._router = Router(suspect_after_s=liveness.suspect_s)
        self._dispatch = JobDispatch(
            catalog,
            self._router,
            self.failover,
            self._nodes,
            cut_off=self.cut_off,
            canary=lambda node, model: self._checks.maybe_canary(
                node, model, self._config.canary_rate
            ),
        )
        self._checks = NodeChecks(
            catalog,
            self.validation,
            self._dispatch.probe,
            serve=lambda node, model: self._router.add(node, (model,)),
            quarantine=self._quarantine,
            rng=rng,
        )
        self._monitor: asyncio.Task[None] | None = None
        # Set when the configuration changes the timings the monitor sleeps by.
        self._retimed = asyncio.Event()
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
        self._dispatch.closing = True
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

        A node whose previous session is still registered (same key) replaces it. The
        new session keeps the node's standing (reputation, failed canaries); a
        quarantined node is refused until an operator releases it.
        """
        admitted = await self.admission.admit(hello, raw_hello, signature, session_nonce)
        standing = self._standings.setdefault(admitted.node_id, NodeStanding())
        if standing.quarantine_reason:
            raise NodeQuarantined(
                f"node {admitted.node_id} is quarantined ({standing.quarantine_reason}); "
                "an operator must release it first (resultity nodes release)"
            )
        for minimum, why in (
            (OLDEST_COMPATIBLE_AGENT, "the protocol's"),
            (self._config.min_agent_version, "the network's"),
        ):
            if not version_at_least(hello.agent_version, minimum):
                raise FailedPrecondition(
                    f"agent version {hello.agent_version or '?'} is older than {why} "
                    f"minimum {minimum}; upgrade the agent"
                )
        if hello.region:
            validate_region(hello.region)
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
            standing=standing,
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
            region=node.region,
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
        """Takes the node out of service until an operator releases it (reconnecting
        does not)."""
        node = self.node(node_id)
        if not node.standing.quarantine_reason:
            node.standing.quarantine_reason = reason or "quarantined by an operator"
            log.warning("node quarantined", node_id=node_id, reason=node.standing.quarantine_reason)
        return node

    def release(self, node_id: str) -> NodeSession | None:
        """Returns a quarantined node to service with a fresh reputation: a connected
        one at once, another when it joins again. The node, if connected."""
        standing = self._standings.get(node_id)
        if standing is None:
            raise NotFound(f"node {node_id} never joined this network server")
        if standing.quarantine_reason:
            log.warning("node released", node_id=node_id, reason=standing.quarantine_reason)
            standing.quarantine_reason = ""
            standing.reputation = NodeStanding().reputation
        return self._nodes.get(node_id)

    @property
    def config(self) -> NetworkConfig:
        return self._config

    def update_config(self, proposed: NetworkConfig, expected_version: int) -> NetworkConfig:
        """Stores the next version and pushes it to every connected agent.

        Its heartbeat timings take effect here too: the agents beat at the new
        interval, so liveness (timeout, suspect threshold) follows it.
        """
        self._config = next_version(self._config, proposed, expected_version)
        self.liveness = replace(
            self.liveness,
            heartbeat_interval_s=self._config.heartbeat_interval_s,
            heartbeat_timeout_s=self._config.heartbeat_timeout_s,
        )
        self._router.suspect_after_s = self.liveness.suspect_s
        self._retimed.set()
        for node in self._nodes.values():
            node.outbox.put_nowait(ConfigCommand(self._config))
        log.info("network configuration updated", version=self._config.version)
        return self._config

    def config_applied(self, node: NodeSession, version: int) -> None:
        node.touch()
        node.config_version = max(node.config_version, version)

    def report(self, node: NodeSession, job_id: str, epoch: int, report: NodeReport) -> None:
        node.touch()
        self._dispatch.report(node, job_id, epoch, report)

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
        self._dispatch.node_lost(node, reason)
        node.outbox.put_nowait(farewell)
        log.info("node removed", node_id=node.node_id, reason=reason)

    async def _watch(self) -> None:
        """Removes silent nodes and gives up stalled assignments."""
        while True:
            # A configuration update wakes the monitor: its timings may be shorter.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval_s()):
                    await self._retimed.wait()
            self._retimed.clear()
            liveness, failover = self.liveness, self.failover
            now = time.monotonic()
            dead_before = now - liveness.heartbeat_timeout_s
            for node in list(self._nodes.values()):
                if node.last_seen < dead_before:
                    self.disconnect(node, "heartbeat timeout")
            self._dispatch.give_up_stalled(
                now - failover.stall_timeout_s, f"no output for {failover.stall_timeout_s:g} s"
            )

    def _check_interval_s(self) -> float:
        liveness = self.liveness
        return (
            min(
                liveness.heartbeat_interval_s,
                liveness.heartbeat_timeout_s,
                liveness.suspect_s,
                self.failover.stall_timeout_s,
            )
            / 2
        )

    def nodes(self) -> list[NodeSession]:
        return list(self._nodes.values())

    def node(self, node_id: str) -> NodeSession:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not connected")
        return node

    # --- catalog and dispatch ---------------------------------------------

    def models(self, requirements: NodeRequirements = NO_REQUIREMENTS) -> list[CatalogModel]:
        """The catalog; ``ready_nodes`` counts the nodes meeting ``requirements``."""
        return [
            replace(model, ready_nodes=self._router.count(model.id, requirements))
            for model in self._catalog
        ]

    def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
    ) -> AsyncGenerator[JobEvent, None]:
        """The job's events (dispatch.py): only nodes meeting ``requirements`` run it,
        first and after every move; closing the iterator early cancels it."""
        return self._dispatch.run_job(job_id, spec, requirements)
