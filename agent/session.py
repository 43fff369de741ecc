"""The agent's session with the network: one bidirectional stream at a time.

Registers with a hello, heartbeats at the interval the network asks for (in
its welcome, then in every network configuration it pushes), runs assigned
jobs and streams their tokens. When the stream breaks it cancels its
jobs (the network has already moved them elsewhere) and reconnects with
jittered exponential backoff; so it does when the network asks it to
reconnect (the server is going away), which is not a failure.

The network may run as several replicas: the agent knows their addresses
(``network`` is comma-separated) and, when a session ends, opens the next one
with the next address, so an agent whose replica crashed or drained re-homes
to another within its backoff. A DNS name resolving to several addresses
works too: each session's channel takes one of those that answer
(round_robin, core/channels.py). A network server that tells an old connection
to go lets the session on it run on (core/channels.py).

``drain`` is the graceful stop: the network is told to send no more jobs, the
running ones finish within a grace period, then the stream is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog
from resultity.agent.v1 import agent_service_pb2 as pb
from resultity.agent.v1 import agent_service_pb2_grpc as pb_grpc

from agent.assignments import generation_request, waiting_report_s
from agent.backoff import Backoff
from agent.batching import MAX_BATCH_DELAY_S, MAX_BATCH_TOKENS
from agent.heartbeats import Heartbeats
from agent.identity import NodeIdentity, signed_hello
from agent.results import ResultSink
from agent.runner import JobRef, JobRunner
from agent.runtime.base import WAITING_REPORT_S, Runtime
from agent.telemetry import AgentMetrics, JobTelemetry
from core import tracing
from core.agent_messages import ConfigApplied, Draining, FailureKind
from core.channels import PLAINTEXT, Tls
from core.channels import channel as open_channel
from core.convert.agent_reports import batch_to_pb, report_to_pb
from core.convert.job_events import assign_from_pb, cancel_from_pb
from core.errors import InvalidArgument
from core.regions import validate_region
from core.replica_channels import parse_targets

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.2.0"


@dataclass(frozen=True)
class SessionSettings:
    # HOST:PORT of a network replica, or several, comma-separated.
    network: str
    node_name: str
    # Used until the network's welcome says otherwise.
    heartbeat_interval_s: float = 5.0
    # How long a stopping agent lets its running jobs finish.
    drain_grace_s: float = 30.0
    # The operator's node token (from the account layer); empty on a network
    # that does not check tokens.
    node_token: str = ""
    # The node's key; `resultity agent` keeps it in its data dir. A fresh one
    # by default (a new node every process).
    identity: NodeIdentity = field(default_factory=NodeIdentity.generate)
    # Generated text is sent in messages of up to this many tokens, or what
    # gathered within the delay (see agent/batching.py); 1 sends every token.
    batch_tokens: int = MAX_BATCH_TOKENS
    batch_delay_s: float = MAX_BATCH_DELAY_S
    # Where the node runs (e.g. "eu-west"), declared in the signed hello for
    # the network's region rules; empty: undeclared.
    region: str = ""
    # TLS to the network: verified with the system's CAs or a pinned CA file.
    tls: Tls = PLAINTEXT

    def __post_init__(self) -> None:
        if self.region:
            validate_region(self.region)
        if not self.targets:
            raise ValueError("no network address given")

    @property
    def targets(self) -> tuple[str, ...]:
        """The network replicas' addresses, in the order they are tried."""
        return parse_targets(self.network)


class AgentSession:
    def __init__(
        self,
        settings: SessionSettings,
        runtime: Runtime,
        *,
        backoff: Backoff | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        """Jobs are measured (agent/telemetry.py) when ``metrics`` is given or tracing
        is on."""
        self._metrics = metrics
        self._settings = settings
        self._runtime = runtime
        self._backoff = backoff or Backoff()
        # Sessions so far: each one opens with the next replica address.
        self._sessions = 0
        self.node_id: str | None = None
        # The network configuration version last applied, and the heartbeat
        # interval in force.
        self.config_version = 0
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        # How often a job the runtime holds back is reported waiting: within the
        # stall timeout of the network this session joined (its welcome).
        self.waiting_report_s = WAITING_REPORT_S
        self.connected = asyncio.Event()
        self.draining = False
        # The live session's outbound queue and runner, for drain().
        self._live: tuple[asyncio.Queue[pb.ConnectRequest | None], JobRunner] | None = None
        self._stopped = asyncio.Event()

    async def run_forever(self) -> None:
        """Keeps a session open until cancelled or drained."""
        try:
            while not self.draining:
                try:
                    reconnect = await self._session()
                    if self.draining:
                        return
                    if reconnect is None:
                        log.warning("network closed the session")
                    else:
                        log.info("network asked to reconnect", reason=reconnect)
                except grpc.aio.AioRpcError as error:
                    log.warning("session ended", code=error.code().name, details=error.details())
                if self.draining:
                    return
                delay = self._backoff.next_delay()
                log.info("reconnecting", delay_s=round(delay, 2), attempt=self._backoff.attempt)
                await asyncio.sleep(delay)
        finally:
            self._stopped.set()

    async def drain(self, grace_s: float | None = None) -> None:
        """Takes no new jobs, lets running ones finish (up to the grace period), then
        closes the session; ``run_forever`` returns. Jobs still running when the
        grace period ends are cancelled here and continued elsewhere by the network.
        """
        grace = self._settings.drain_grace_s if grace_s is None else grace_s
        self.draining = True
        live = self._live
        if live is not None:
            outbound, runner = live
            outbound.put_nowait(report_to_pb(Draining()))
            log.info("draining", node_id=self.node_id, active=runner.active, grace_s=grace)
            try:
                async with asyncio.timeout(grace):
                    await runner.wait_idle()
            except TimeoutError:
                log.warning("grace period over; leaving jobs to other nodes", active=runner.active)
            # Half-closing the stream ends the session: the network forgets the node.
            outbound.put_nowait(None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._stopped.wait()
        log.info("drained", node_id=self.node_id)

    def load(self) -> tuple[int, int]:
        """Jobs running and queued on the live session (none between sessions)."""
        live = self._live
        return (0, 0) if live is None else (live[1].active, live[1].queued)

    @property
    def target(self) -> str:
        """The replica address the current (or next) session uses."""
        targets = self._settings.targets
        return targets[self._sessions % len(targets)]

    def _hello(self, challenge: pb.Challenge) -> pb.ConnectRequest:
        hello = pb.Hello(
            node_name=self._settings.node_name,
            agent_version=AGENT_VERSION,
            models=[
                pb.ServedModel(model=m.model, runtime=m.runtime, context_length=m.context_length)
                for m in self._runtime.models
            ],
            max_concurrent_jobs=self._runtime.slots,
            region=self._settings.region,
        )
        return signed_hello(self._settings.identity, hello, challenge, self._settings.node_token)

    async def _session(self) -> str | None:
        """One session; returns the reason if the network asked to reconnect."""
        outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        sink = ResultSink(outbound, self._settings.identity)
        telemetry = (
            JobTelemetry(sink, self._metrics or AgentMetrics())
            if self._metrics is not None or tracing.enabled()
            else None
        )
        runner = JobRunner(
            self._runtime,
            telemetry or sink,
            batch_tokens=self._settings.batch_tokens,
            batch_delay_s=self._settings.batch_delay_s,
        )
        channel = open_channel(self.target, self._settings.tls)
        heartbeats = Heartbeats(outbound, runner, self._settings.heartbeat_interval_s)
        try:
            call = pb_grpc.AgentServiceStub(channel).Connect(_drain(outbound))
            async for response in call:
                kind = response.WhichOneof("message")
                if kind == "challenge":
                    outbound.put_nowait(self._hello(response.challenge))
                elif kind == "welcome":
                    welcome = response.welcome
                    heartbeats.set_interval(welcome.heartbeat_interval.ToNanoseconds() / 1e9)
                    self.heartbeat_interval_s = heartbeats.interval_s
                    self.waiting_report_s = waiting_report_s(
                        welcome.stall_timeout.ToNanoseconds() / 1e9
                    )
                    self.node_id = welcome.node_id
                    # This session's task and the jobs it starts log the node's id.
                    structlog.contextvars.bind_contextvars(node_id=self.node_id)
                    if telemetry is not None:
                        telemetry.node_id = welcome.node_id
                    self._backoff.reset()
                    self._live = (outbound, runner)
                    self.connected.set()
                    log.info(
                        "registered",
                        node_id=self.node_id,
                        network=self.target,
                        region=self._settings.region or None,
                        heartbeat_s=heartbeats.interval_s,
                        waiting_report_s=self.waiting_report_s,
                    )
                    heartbeats.start()
                elif kind == "config":
                    self._apply(response.config, heartbeats, outbound)
                elif kind == "assign_job":
                    self._assign(runner, sink, telemetry, response.assign_job)
                elif kind == "cancel_job":
                    cancel = cancel_from_pb(response.cancel_job)
                    job = JobRef(cancel.job_id, cancel.epoch)
                    runner.cancel(job)
                    sink.forget(job)
                    if telemetry is not None:
                        telemetry.cancelled(job)
                elif kind == "reconnect":
                    return response.reconnect.reason
            return None
        finally:
            self._live = None
            self.connected.clear()
            heartbeats.stop()
            await runner.cancel_all()
            if telemetry is not None:
                telemetry.close()
            outbound.put_nowait(None)
            await channel.close(grace=None)
            self._sessions += 1

    def _apply(
        self,
        config: pb.NetworkConfig,
        heartbeats: Heartbeats,
        outbound: asyncio.Queue[pb.ConnectRequest | None],
    ) -> None:
        """Applies what the agent uses of a configuration (its heartbeat interval; the
        rest is the network's own), then acknowledges the version."""
        heartbeats.set_interval(config.heartbeat_interval.ToNanoseconds() / 1e9)
        self.heartbeat_interval_s = heartbeats.interval_s
        self.config_version = config.version
        log.info(
            "network configuration applied",
            version=config.version,
            heartbeat_s=heartbeats.interval_s,
        )
        outbound.put_nowait(report_to_pb(ConfigApplied(config.version)))

    def _assign(
        self,
        runner: JobRunner,
        sink: ResultSink,
        telemetry: JobTelemetry | None,
        assign: pb.AssignJob,
    ) -> None:
        job = JobRef(assign.job_id, assign.epoch)
        try:
            command = assign_from_pb(assign)
            request = generation_request(command, self.waiting_report_s)
        except InvalidArgument as error:
            param = error.metadata.get("field", "")
            sink.failed(job, FailureKind.INVALID_REQUEST, error.message, param)
            return
        if telemetry is not None:
            telemetry.assigned(job, command)
        runner.start(job, request)


async def _drain(
    outbound: asyncio.Queue[pb.ConnectRequest | None],
) -> AsyncIterator[pb.ConnectRequest]:
    """The session's messages until its end (None). What queued up while the stream
    sent the previous message goes as one batch; nothing waits for more."""
    ended = False
    while not ended and (message := await outbound.get()) is not None:
        ready = [message]
        while not ended and not outbound.empty():
            more = outbound.get_nowait()
            if more is None:
                ended = True
            else:
                ready.append(more)
        yield message if len(ready) == 1 else batch_to_pb(ready)
