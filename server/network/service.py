"""The network's domain service: node sessions, liveness, configuration, and
the jobs they run (dispatch.py).

Pure asyncio: the servicers translate gRPC to these calls and back.

Nodes are verified (validation.py): on join, per offered model, a benchmark
job and the model's known-answer canaries run on the node before the router
may send it that model; in service, a sampled share of dispatched jobs also
sends the node a disguised canary, an ordinary-looking job whose output is
compared with the reference instead of relayed. Canary results move the
node's reputation; below the threshold it is quarantined.

The service is one replica of the network (fleet.py): it publishes its nodes'
presence, routes over every replica's nodes, and runs a job on another
replica's node through that replica (forwarding.py); an operator's action on
such a node is carried out by that replica too (node_actions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import structlog

from core.agent_messages import (
    AgentReport,
    ChunkReport,
    ConfigApplied,
    DoneReport,
    Draining,
    FailedReport,
    Heartbeat,
    StartedReport,
    WaitingReport,
)
from core.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NodeQuarantined,
    NotFound,
    ReplicaUnreachable,
    SessionEnded,
)
from core.inference import (
    NO_ORIGIN,
    CatalogModel,
    Continuation,
    GenerationSpec,
    JobEvent,
    JobOrigin,
    NodeRequirements,
)
from core.job_records import JobQuery, JobRecord, validate_query
from core.namespace import RedisNames
from core.regions import validate_region
from core.trace_context import UNTRACED, TraceContext
from server.common.bus import Bus
from server.common.channel_follower import ChannelFollower
from server.common.paging import decode_text_cursor, encode_cursor, page_size
from server.network.admission import AdmissionSettings, NodeAdmission
from server.network.announcements import version_of
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
from server.network.fleet import Fleet, ReplicaSettings
from server.network.forwarding import ForwardedJobs, Forwarder, ReplicaUnavailable
from server.network.jobs import NodeReport
from server.network.metrics import NetworkMetrics
from server.network.node_actions import Drain, NodeAction, NodeAdmin, Release
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
    SignedHello,
)
from server.network.presence import InProcessPresence, Presence
from server.network.remote_nodes import RemoteNode
from server.network.routing import NO_REQUIREMENTS, Router
from server.network.settings import FailoverSettings, LivenessSettings, ValidationSettings
from server.network.state import NetworkState
from server.network.state_ports import ConfigAck, NetworkStores

__all__ = ["FailoverSettings", "LivenessSettings", "NetworkService", "ValidationSettings"]

log = structlog.get_logger(__name__)

# Job records one call may ask for (a request's jobs: one per choice or input).
MAX_JOB_RECORDS = 128


class NetworkService:
    def __init__(
        self,
        catalog: Catalog,
        liveness: LivenessSettings,
        failover: FailoverSettings | None = None,
        admission: NodeAdmission | None = None,
        validation: ValidationSettings | None = None,
        *,
        stores: NetworkStores,
        bus: Bus,
        names: RedisNames,
        forwarder: Forwarder,
        node_admin: NodeAdmin,
        replica: ReplicaSettings | None = None,
        presence: Presence | None = None,
        rng: random.Random | None = None,
        metrics: NetworkMetrics | None = None,
        trace_context: TraceContext = UNTRACED,
    ) -> None:
        """Standings, configuration versions, acknowledgements and job records live
        in ``stores``; new configuration versions and released nodes are announced
        to the other replicas over ``bus``, on the channels ``names`` gives them.
        ``replica`` names this replica and the
        address others forward jobs to; ``presence`` is shared with the other
        replicas (default: this process's own, one replica); ``forwarder`` runs jobs,
        and ``node_admin`` operators' actions, through the replica owning a node.
        ``metrics`` counts jobs, routing, failovers and canaries; assignments carry
        ``trace_context``'s."""
        self.metrics = metrics or NetworkMetrics()
        self.admission = admission or NodeAdmission(AdmissionSettings(), None)
        self.validation = validation or ValidationSettings()

        self._catalog = catalog
        self.liveness = liveness
        self.failover = failover or FailoverSettings()
        self._nodes: dict[str, NodeSession] = {}
        self._state = NetworkState(stores)
        self._router = Router(suspect_after_s=liveness.suspect_s)
        self._node_admin = node_admin
        self._fleet = Fleet(
            replica or ReplicaSettings(replica_id=uuid.uuid4().hex, address=""),
            presence or InProcessPresence(),
            self._router,
            self._nodes,
            interval_s=lambda: self.liveness.heartbeat_interval_s,
        )
        self._dispatch = JobDispatch(
            catalog,
            self._router,
            self.failover,
            self._nodes,
            cut_off=self.cut_off,
            canary=lambda node, model: self._checks.maybe_canary(
                node, model, self._config.canary_rate
            ),
            journal=self._state.journal,
            forwarded=ForwardedJobs(forwarder, unreachable=self._fleet.remote.unreachable),
            metrics=self.metrics,
            trace_context=trace_context,
        )
        self._checks = NodeChecks(
            catalog,
            self.validation,
            self._dispatch.probe,
            serve=lambda node, model: self._router.add(node, (model,)),
            quarantine=self._quarantine,
            standing_changed=self._state.standing_changed,
            rng=rng,
            canaries=self.metrics.canaries,
        )
        self._monitor: asyncio.Task[None] | None = None
        # When each catalog model entered the catalog (start() reads it).
        self._catalog_added: dict[str, datetime] = {}
        # Set when the configuration changes the timings the monitor sleeps by.
        self._retimed = asyncio.Event()
        network_id = self.admission.settings.network_id
        self._configs = ChannelFollower(
            bus,
            names.network_channel(network_id, "config"),
            lambda message: self._catch_up(version_of(message)),
            catch_up=lambda: self._catch_up(0),
        )
        self._standings = ChannelFollower(
            bus, names.network_channel(network_id, "standings"), self._standing_announced
        )
        # Serialises this replica's configuration changes; the store orders replicas.
        self._config_lock = asyncio.Lock()
        # Version 1 when the store holds none; start() loads the current one.
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

    async def start(self) -> None:
        """Loads the current configuration and follows its changes on every replica."""
        self._state.start()
        self._apply_config(await self._state.current_config(self._config))
        self._catalog_added = await self._state.catalog_added([m.id for m in self._catalog])
        await self._configs.start()
        await self._standings.start()
        self._monitor = asyncio.create_task(self._watch(), name="liveness")
        self._fleet.start()

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Asks every agent to reconnect (to another server, or to this one restarted),
        then writes the records of the jobs that ended (within ``grace_s``)."""
        self._dispatch.closing = True
        await self._configs.stop()
        await self._standings.stop()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        self._checks.stop()
        for node in list(self._nodes.values()):
            reason = "network server shutting down"
            self._remove(node, reason, ReconnectCommand(reason))
        await self._fleet.stop()
        # Jobs whose nodes were removed end as their callers read the news.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while self._dispatch.running:  # noqa: ASYNC110 - jobs end in their callers' tasks
                    await asyncio.sleep(0.05)
        await self._state.close(grace_s)

    @property
    def replica_id(self) -> str:
        return self._fleet.settings.replica_id

    # --- node sessions ---------------------------------------------------

    def challenge(self) -> bytes:
        """The nonce a new session's hello must be bound to."""
        return self.admission.challenge()

    async def join(
        self, nonce: bytes, opening: Awaitable[SignedHello | None]
    ) -> NodeSession | None:
        """Registers the node whose signed hello (``opening``, the stream's first message)
        answers the challenge ``nonce``; None if the stream ended before it. A stream
        that sends no hello within the admission's timeout is ended: it would hold its
        slot forever. However the opening fails, the nonce is withdrawn: it can never be
        answered again."""
        try:
            try:
                async with asyncio.timeout(self.admission.settings.hello_timeout_s):
                    signed = await opening
            except TimeoutError:
                raise SessionEnded("no signed hello in time") from None
            if signed is not None:
                return await self.register(signed.hello, signed.raw, signed.signature, nonce)
        except BaseException:
            self.admission.withdraw(nonce)
            raise
        self.admission.withdraw(nonce)
        return None

    def handle(self, node: NodeSession, report: AgentReport) -> None:
        """One message of the node's session after its hello."""
        if isinstance(
            report, ChunkReport | StartedReport | WaitingReport | DoneReport | FailedReport
        ):
            self.report(node, report.job_id, report.epoch, report)
        elif isinstance(report, Heartbeat):
            self.heartbeat(
                node,
                active=report.active_jobs,
                queued=report.queued_jobs,
                tokens_per_second=report.recent_tokens_per_second,
                free_memory_bytes=report.free_memory_bytes,
                cached_prefixes=report.cached_prefixes,
            )
        elif isinstance(report, ConfigApplied):
            self.config_applied(node, report.version)
        elif isinstance(report, Draining):
            self.draining(node)

    async def register(
        self, hello: NodeHello, raw_hello: bytes, signature: bytes, session_nonce: bytes
    ) -> NodeSession:
        """Admits the node (signature, challenge, clock window, token), then registers it.

        A node whose previous session is still registered (same key) replaces it. The
        new session keeps the node's standing (reputation, failed canaries); a
        quarantined node is refused until an operator releases it.
        """
        admitted = await self.admission.admit(hello, raw_hello, signature, session_nonce)
        previous = self._nodes.get(admitted.node_id)
        if previous is not None:
            standing = previous.standing
        else:
            stored = await self._state.standing(admitted.node_id)
            standing = NodeStanding() if stored is None else stored.standing()
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
        # Records that the node joined (and for which operator).
        self._state.standing_changed(node)
        self._fleet.joined(node)
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
        cached_prefixes: Sequence[int] = (),
    ) -> None:
        node.touch()
        node.last_heartbeat_at = datetime.now(UTC)
        node.queued_jobs = queued
        node.recent_tokens_per_second = tokens_per_second
        node.free_memory_bytes = free_memory_bytes
        node.cached_prefixes = frozenset(cached_prefixes)

    def draining(self, node: NodeSession) -> None:
        """The node takes no new jobs; it finishes its own and then closes."""
        node.touch()
        if not node.draining:
            node.draining = True
            log.info("node draining", node_id=node.node_id, jobs=len(node.active_jobs))

    # --- admin and configuration -------------------------------------------

    def fleet_nodes(self) -> list[NodeSession | RemoteNode]:
        """Every live node of the network: this replica's and the others' (as presence
        describes them)."""
        return [*self._nodes.values(), *self._fleet.remote.nodes()]

    def fleet_node(self, node_id: str) -> NodeSession | RemoteNode:
        node = self._nodes.get(node_id) or self._fleet.remote.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not connected")
        return node

    async def act(self, node_id: str, action: NodeAction) -> NodeSession | RemoteNode | None:
        """Carries an operator's action out on the node (node_actions.py): here when it
        is connected here or to no replica, else through the replica holding it. The
        node afterwards; None when a release found it connected nowhere."""
        remote = None if node_id in self._nodes else self._fleet.remote.get(node_id)
        if remote is None:
            return await self.act_here(node_id, action)
        try:
            outcome = await self._node_admin.act(remote.replica_address, node_id, action)
        except ReplicaUnavailable as error:
            log.warning(
                "node action unreachable",
                node_id=node_id,
                replica_id=remote.replica_id,
                error=str(error),
            )
            raise ReplicaUnreachable(
                f"node {node_id} is connected to network replica {remote.replica_id}, which "
                "cannot be reached; the action may not have been carried out: try again",
                metadata={"replica_id": remote.replica_id},
            ) from None
        if outcome.state is None:
            return None
        outcome.apply_to(remote)
        return remote

    async def act_here(self, node_id: str, action: NodeAction) -> NodeSession | None:
        """Carries the action out on a node connected here (NotFound for another); a
        release also clears the stored quarantine of a node connected nowhere."""
        if isinstance(action, Release):
            return await self._release(node_id)
        node = self.node(node_id)
        if isinstance(action, Drain):
            self.draining(node)
        else:
            self._quarantine(node, action.reason)
            await self._state.standing_written(node_id)
        return node

    def _quarantine(self, node: NodeSession, reason: str) -> None:
        if node.node_id in self._nodes and not node.standing.quarantine_reason:
            node.standing.quarantine_reason = reason or "quarantined by an operator"
            log.warning(
                "node quarantined", node_id=node.node_id, reason=node.standing.quarantine_reason
            )
            self._state.standing_changed(node)

    async def _release(self, node_id: str) -> NodeSession | None:
        """Returns a quarantined node to service with a fresh reputation: a connected
        one at once, another when it joins again. The node, if connected here."""
        node = self._nodes.get(node_id)
        if node is not None:
            standing, operator = node.standing, node.operator_account_id
        else:
            stored = await self._state.standing(node_id)
            if stored is None:
                raise NotFound(f"node {node_id} never joined this network")
            standing, operator = stored.standing(), stored.operator_account_id
        if standing.quarantine_reason:
            log.warning("node released", node_id=node_id, reason=standing.quarantine_reason)
            standing.quarantine_reason = ""
            standing.reputation = NodeStanding().reputation
            self._state.put_standing(node_id, operator, standing)
            await self._state.standing_written(node_id)
            # The replica the node is connected to, if another, restores it at once.
            await self._standings.announce(node_id.encode())
        return node

    async def _standing_announced(self, message: bytes) -> None:
        """Another replica changed a node's standing: a node connected here takes the
        stored one, unless this replica has a newer change of its own to write."""
        node = self._nodes.get(message.decode(errors="replace"))
        if node is None:
            return
        stored = await self._state.standing_unless_pending(node.node_id)
        if stored is not None:
            stored.apply_to(node.standing)

    @property
    def config(self) -> NetworkConfig:
        return self._config

    async def update_config(self, proposed: NetworkConfig, expected_version: int) -> NetworkConfig:
        """Stores the next version, pushes it to this replica's agents and announces
        it to the other replicas, which push it to theirs.

        Its heartbeat timings take effect here too: the agents beat at the new
        interval, so liveness (timeout, suspect threshold) follows it.
        """
        async with self._config_lock:
            await self._load_newer_config()
            config = next_version(self._config, proposed, expected_version)
            if not await self._state.add_config(config):
                raise FailedPrecondition(
                    f"the configuration changed meanwhile (version {config.version} exists); "
                    "read it again"
                )
            self._apply_config(config)
        await self._configs.announce(str(config.version).encode())
        return config

    async def _catch_up(self, version: int) -> None:
        """Applies the newest stored version if it is newer than this replica's
        (``version``: the one announced, 0 when unknown)."""
        if version and version <= self._config.version:
            return
        async with self._config_lock:
            await self._load_newer_config()

    async def _load_newer_config(self) -> None:
        latest = await self._state.latest_config()
        if latest is not None and latest.version > self._config.version:
            self._apply_config(latest)

    def _apply_config(self, config: NetworkConfig) -> None:
        self._config = config
        self.liveness = replace(
            self.liveness,
            heartbeat_interval_s=self._config.heartbeat_interval_s,
            heartbeat_timeout_s=self._config.heartbeat_timeout_s,
        )
        self._router.suspect_after_s = self.liveness.suspect_s
        self._retimed.set()
        for node in self._nodes.values():
            node.outbox.put_nowait(ConfigCommand(self._config))
        log.info("network configuration applied", version=self._config.version)

    def config_applied(self, node: NodeSession, version: int) -> None:
        node.touch()
        node.config_version = max(node.config_version, version)
        # Only versions this replica sent the agent exist to be acknowledged.
        if 0 < version <= self._config.version:
            self._state.config_acked(node.node_id, version)

    async def job_records(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The records of those of ``job_ids`` this network ran (on any replica)."""
        if len(job_ids) > MAX_JOB_RECORDS:
            raise InvalidArgument(f"at most {MAX_JOB_RECORDS} job ids per call", field="job_ids")
        return await self._state.job_records(job_ids)

    async def list_job_records(
        self, query: JobQuery, requested_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        """Records matching ``query`` (of every replica), newest first, and the next
        page's token."""
        limit = page_size(requested_size)
        records = await self._state.list_job_records(
            validate_query(query), limit + 1, decode_text_cursor(page_token)
        )
        if len(records) <= limit:
            return records, ""
        last = records[limit - 1]
        return records[:limit], encode_cursor(last.created_at, last.job_id)

    async def config_acks(
        self, version: int, after_node_id: str, limit: int
    ) -> tuple[int, list[ConfigAck]]:
        """The acknowledgements of ``version`` (0: the current one), by node id."""
        version = version or self._config.version
        if not await self._state.config_exists(version):
            raise NotFound(f"configuration version {version} does not exist")
        return version, await self._state.config_acks(version, after_node_id, limit)

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
        self._fleet.left(node)
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
            self._dispatch.give_up_stalled(now, f"no output for {failover.stall_timeout_s:g} s")

    def _check_interval_s(self) -> float:
        liveness = self.liveness
        return (
            min(
                liveness.heartbeat_interval_s,
                liveness.heartbeat_timeout_s,
                liveness.suspect_s,
                self.failover.stall_timeout_s,
                self.failover.queue_timeout_s,
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
            replace(
                model,
                ready_nodes=self._router.count(model.id, requirements),
                created=self._catalog_added.get(model.id),
            )
            for model in self._catalog
        ]

    def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
        origin: JobOrigin = NO_ORIGIN,
    ) -> AsyncGenerator[list[JobEvent], None]:
        """The job's events (dispatch.py), those ready together in one list: only nodes
        meeting ``requirements`` run it, first and after every move; closing the
        iterator early cancels it. Its record names ``origin``."""
        return self._dispatch.run_job(job_id, spec, requirements, origin)

    def run_forwarded(
        self,
        job_id: str,
        epoch: int,
        node_id: str,
        spec: GenerationSpec,
        continuation: Continuation | None = None,
    ) -> AsyncGenerator[NodeReport, None]:
        """One assignment of a job another replica coordinates, on a node of this one
        (dispatch.py); closing the iterator early cancels it."""
        return self._dispatch.run_forwarded(job_id, epoch, node_id, spec, continuation)
