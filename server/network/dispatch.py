"""Jobs in flight: assignment, relay of node reports, failover and probes.

A job survives the loss of its node: when the node's stream ends, its
heartbeats stop, it stalls on the job or it drains out without finishing it,
the job moves to another node meeting the job's requirements under a new
epoch, as a continuation of what the caller already received. Reports from
a given-up epoch are dropped, and a result is relayed only when the node's
signature covers what it streamed.

The fleet may span several network replicas: the router also holds nodes
other replicas own (remote_nodes.py). A job on such a node runs through its
owner (forwarding.py) while this replica stays its coordinator; the owner's
side of that is ``run_forwarded``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

import structlog

from core.agent_messages import (
    AssignCommand,
    CancelCommand,
    ChunkReport,
    DoneReport,
    FailedReport,
    FailureKind,
    StartedReport,
    WaitingReport,
)
from core.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    InvalidResultSignature,
    JobFailed,
    NoCapacity,
    NotFound,
)
from core.inference import (
    NO_ORIGIN,
    Continuation,
    GenerationSpec,
    JobAssigned,
    JobEvent,
    JobFinished,
    JobMigrated,
    JobOrigin,
    NodeRequirements,
)
from core.job_records import JobOutcome
from core.node_signing import result_payload, verify
from core.trace_context import UNTRACED, Carrier, TraceContext
from server.network.catalog import Catalog
from server.network.checks import Probe
from server.network.forwarding import Assignment, ForwardedJobs
from server.network.job_records import JobJournal
from server.network.jobs import ActiveJob, NodeLost, NodeReport, QueueTimeout
from server.network.metrics import NetworkMetrics
from server.network.nodes import NodeSession
from server.network.remote_nodes import RemoteNode
from server.network.routable import RoutableNode
from server.network.routing import NO_REQUIREMENTS, Router, RouteRequest, job_prefixes
from server.network.settings import FailoverSettings

log = structlog.get_logger(__name__)


class JobDispatch:
    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        failover: FailoverSettings,
        nodes: Mapping[str, NodeSession],
        *,
        cut_off: Callable[[NodeSession, DomainError], None],
        canary: Callable[[NodeSession, str], None],
        journal: JobJournal,
        forwarded: ForwardedJobs,
        metrics: NetworkMetrics | None = None,
        trace_context: TraceContext = UNTRACED,
    ) -> None:
        """``nodes`` are the connected nodes (the service's own map); ``cut_off`` ends
        a node's session; ``canary`` may send a node that got a job of a model a
        disguised canary of it; ``journal`` records each job (probes are not jobs);
        ``forwarded`` runs assignments on other replicas' nodes. Each assignment
        carries ``trace_context``'s current context (a probe a decoy)."""
        self._metrics = metrics or NetworkMetrics()
        self._trace_context = trace_context
        self._catalog = catalog
        self._router = router
        self._failover = failover
        self._nodes = nodes
        self._cut_off = cut_off
        self._canary = canary
        self._journal = journal
        self._forwarded = forwarded
        self._jobs: dict[str, ActiveJob] = {}
        # The server is shutting down: no new assignments.
        self.closing = False

    async def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
        origin: JobOrigin = NO_ORIGIN,
    ) -> AsyncGenerator[list[JobEvent], None]:
        """Runs the job, moving it to another node if its node is lost; yields its events,
        those ready together (reported by the time the relay got to them) in one list.

        Only nodes meeting ``requirements`` run it, first and after every move.
        Closing the iterator early (caller cancelled) cancels the job on the node.
        """
        catalog_model = self._catalog.get(spec.model)
        if job_id in self._jobs:
            raise InvalidArgument(f"job {job_id} is already running", field="job_id")
        if spec.max_prompt_tokens > catalog_model.context_length:
            raise InvalidArgument(
                "max_prompt_tokens exceeds the context", field="max_prompt_tokens"
            )
        prefixes = job_prefixes(spec)
        node = self._pick(RouteRequest(spec.model, requirements=requirements, prefixes=prefixes))
        if node is None or self.closing:
            allowed = "" if requirements == NO_REQUIREMENTS else " meeting the job's requirements"
            raise NoCapacity(f"no node{allowed} is serving the model '{spec.model}' right now")

        job = ActiveJob(
            job_id=job_id,
            spec=spec,
            node_id=node.node_id,
            operator_account_id=node.operator_account_id,
            requirements=requirements,
            prefixes=prefixes,
        )
        self._jobs[job_id] = job
        self._assign(job, node)
        self._journal.assigned(job, origin)
        bound = log.bind(job_id=job_id)
        bound.info("job assigned", node_id=node.node_id, model=spec.model)
        if isinstance(node, NodeSession):
            self._canary(node, spec.model)
        end = _End()
        try:
            yield [JobAssigned(node.node_id)]
            while not end.finished:
                reports = [await job.reports.get()]
                while not job.reports.empty():
                    reports.append(job.reports.get_nowait())
                events: list[JobEvent] = []
                failure: Exception | None = None
                try:
                    for epoch, report in reports:
                        event = self._relay(job, epoch, report, end, bound)
                        if event is not None:
                            events.append(event)
                        if end.finished:
                            break
                except Exception as error:  # the job's failure, raised after its events
                    failure = error
                # What came before a failure is delivered before it.
                if events:
                    yield events
                if failure is not None:
                    raise failure
        finally:
            self._jobs.pop(job_id, None)
            self._journal.ended(job, end.outcome, end.detail)
            self._metrics.jobs.inc(spec.model, end.outcome.value)
            self._forwarded.stop(job_id)
            current = self._nodes.get(job.node_id)
            if current is not None:
                current.active_jobs.discard(job_id)
                if not end.finished:
                    current.outbox.put_nowait(CancelCommand(job_id, job.epoch))
                    bound.info("job cancelled by caller", node_id=job.node_id)

    def _relay(
        self,
        job: ActiveJob,
        epoch: int,
        report: NodeReport,
        end: _End,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> JobEvent | None:
        """The caller's event for one of the job's reports, if any; raises the job's
        failure. Records how the job ended in ``end``."""
        if epoch != job.epoch or isinstance(report, StartedReport | WaitingReport):
            return None  # queued before the job moved on; or no news for the caller
        if isinstance(report, ChunkReport):
            if not job.delivered_tokens:
                self._journal.first_token(job)
            return job.record(report)
        if isinstance(report, QueueTimeout):
            bound.warning("job waited too long in its node's queue", node_id=job.node_id)
            # Not finished: the node is told to drop it (run_job's finally).
            end.outcome, end.detail = JobOutcome.FAILED, "waited too long in the node's queue"
            raise NoCapacity(
                f"the job waited {report.waited_s:.0f} s for a free slot on its node; "
                "the model's nodes are busy, retry later",
                metadata={"retry_after_s": str(self._failover.queue_retry_after_s)},
            )
        if isinstance(report, DoneReport):
            end.finished = True
            end.outcome, end.detail = JobOutcome.FINISHED, report.finish_reason.value
            job.verified()
            # Completion tokens are what was relayed, not what the node claims.
            usage = job.usage(report.usage.prompt_tokens)
            if report.usage.completion_tokens != job.node_usage()[-1].usage.completion_tokens:
                bound.warning(
                    "node usage differs from relayed tokens",
                    node_id=job.node_id,
                    claimed=report.usage.completion_tokens,
                    relayed=job.node_usage()[-1].usage.completion_tokens,
                )
            return JobFinished(report.finish_reason, usage, job.node_usage())
        if isinstance(report, FailedReport):
            end.finished = True
            end.outcome, end.detail = JobOutcome.FAILED, f"{report.kind}: {report.message}"
            raise _failure_error(report)
        moved = self._migrate(job, report, bound)
        if moved is None:
            end.finished = True
            end.outcome, end.detail = JobOutcome.FAILED, f"node lost: {report.reason}"
            raise JobFailed(f"node lost mid-job: {report.reason}")
        self._journal.migrated(job, moved.operator_account_id)
        return JobMigrated(moved.node_id, job.epoch, report.reason)

    def _pick(self, request: RouteRequest) -> RoutableNode | None:
        began = time.monotonic()
        route = self._router.pick(request, began)
        self._metrics.routing_decision.observe(
            time.monotonic() - began, "none" if route is None else "picked"
        )
        if route is None:
            return None
        self._metrics.routing_affinity.inc(request.model, route.affinity.value)
        return route.node

    def _assign(self, job: ActiveJob, node: RoutableNode) -> None:
        continuation = job.continuation() if job.migrations else None
        spec = job.remaining_spec() if job.migrations else job.spec
        job.last_progress = job.assigned_at = time.monotonic()
        job.running = False
        if isinstance(node, RemoteNode):
            assignment = Assignment(job.job_id, job.epoch, node.node_id, spec, continuation)
            self._forwarded.start(job, node, assignment)
            return
        assert isinstance(node, NodeSession)
        node.active_jobs.add(job.job_id)
        node.outbox.put_nowait(
            AssignCommand(job.job_id, job.epoch, spec, continuation, self._trace_context.current())
        )

    def _migrate(
        self, job: ActiveJob, lost: NodeLost, bound: structlog.typing.FilteringBoundLogger
    ) -> RoutableNode | None:
        """Moves ``job`` off its lost node; returns the new node, or None if it cannot."""
        self._forwarded.stop(job.job_id)
        old = self._nodes.get(job.node_id)
        if old is not None:
            # Stalled or partitioned, not gone: stop it working on the job.
            old.active_jobs.discard(job.job_id)
            old.outbox.put_nowait(CancelCommand(job.job_id, job.epoch))
        if self.closing or job.migrations >= self._failover.max_migrations:
            bound.warning(
                "job lost its node and cannot move", reason=lost.reason, migrations=job.migrations
            )
            self._metrics.failovers.inc(job.spec.model, "abandoned")
            return None
        node = self._pick(
            RouteRequest(job.spec.model, frozenset(job.tried), job.requirements, job.prefixes)
        )
        if node is None:
            bound.warning("job lost its node and no other can continue it", reason=lost.reason)
            self._metrics.failovers.inc(job.spec.model, "abandoned")
            return None
        self._metrics.failovers.inc(job.spec.model, "migrated")
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

    def report(self, node: NodeSession, job_id: str, epoch: int, report: NodeReport) -> None:
        """Routes a node's report to its job, dropping reports the node does not own.

        A result whose signature does not cover what the node streamed cuts the
        node off (its jobs move on, unpaid).
        """
        job = self._jobs.get(job_id)
        if job is None or not job.accepts(node.node_id, epoch):
            log.info("stale job report dropped", node_id=node.node_id, job_id=job_id, epoch=epoch)
            return
        job.heard(report, time.monotonic())
        if isinstance(report, ChunkReport):
            job.output(epoch).add(report.text, report.token_ids, report.logprobs, report.embedding)
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
                self._cut_off(
                    node,
                    InvalidResultSignature(
                        f"the result of job {job_id} (epoch {epoch}) is not signed by this "
                        "node over what it streamed",
                        metadata={"job_id": job_id, "epoch": str(epoch)},
                    ),
                )
                return
        job.post(epoch, report)

    def node_lost(self, node: NodeSession, reason: str) -> None:
        """Gives up the node's assignments: their jobs move on."""
        for job_id in list(node.active_jobs):
            job = self._jobs.get(job_id)
            if job is not None and job.node_id == node.node_id:
                job.give_up(reason)

    @property
    def running(self) -> int:
        """Jobs and probes in flight."""
        return len(self._jobs)

    def give_up_stalled(self, now: float, reason: str) -> None:
        """Gives up running assignments silent for the stall timeout, and fails those
        still queued on their node after the queue timeout."""
        for job in list(self._jobs.values()):
            if job.stalled(now, self._failover.stall_timeout_s):
                job.give_up(reason)
            elif job.queued_too_long(now, self._failover.queue_timeout_s):
                job.expire(now)

    async def probe(self, node: NodeSession, spec: GenerationSpec) -> Probe | None:
        """Runs ``spec`` on ``node`` as an ordinary job, keeping its output to itself.

        None when the assignment was given up (node lost, stalled or cut off).
        """
        job = ActiveJob(
            job_id=uuid.uuid4().hex,
            spec=spec,
            node_id=node.node_id,
            operator_account_id=node.operator_account_id,
        )
        assigned_at = time.monotonic()
        texts: list[str] = []
        tokens = 0
        first_token_at = 0.0
        running = self._run_on(node, job, trace_context=self._trace_context.decoy())
        async with contextlib.aclosing(running) as reports:
            async for report in reports:
                if isinstance(report, ChunkReport):
                    if not texts:
                        first_token_at = time.monotonic()
                    texts.append(report.text)
                    tokens += report.token_count
                elif isinstance(report, StartedReport | WaitingReport):
                    continue
                elif isinstance(report, QueueTimeout):
                    return None  # still queued on the node: cancelled there below
                elif isinstance(report, DoneReport | FailedReport):
                    done_at = time.monotonic()
                    return Probe(
                        done=isinstance(report, DoneReport),
                        text="".join(texts),
                        tokens=tokens,
                        assigned_at=assigned_at,
                        first_token_at=first_token_at or done_at,
                        done_at=done_at,
                    )
        return None

    def run_forwarded(
        self,
        job_id: str,
        epoch: int,
        node_id: str,
        spec: GenerationSpec,
        continuation: Continuation | None = None,
    ) -> AsyncGenerator[NodeReport, None]:
        """Runs one assignment of a job another replica coordinates on a node of this
        one; yields the node's reports (results checked against their signatures)
        until the final one. Closing the iterator early cancels it on the node.

        A newer epoch of the same job replaces an older one still running here (the
        coordinator moved the job from one of this replica's nodes to another).
        """
        node = self._nodes.get(node_id)
        if node is None or self.closing:
            raise NotFound(f"node {node_id} is not connected to this network replica")
        existing = self._jobs.get(job_id)
        if existing is not None:
            if existing.epoch >= epoch:
                raise FailedPrecondition(
                    f"job {job_id} already runs here under epoch {existing.epoch}"
                )
            existing.give_up(f"superseded by epoch {epoch}")
        job = ActiveJob(
            job_id=job_id,
            spec=spec,
            node_id=node_id,
            epoch=epoch,
            operator_account_id=node.operator_account_id,
        )
        log.info("forwarded job assigned", job_id=job_id, node_id=node_id, epoch=epoch)
        self._canary(node, spec.model)
        return self._run_on(node, job, continuation, self._trace_context.current())

    async def _run_on(
        self,
        node: NodeSession,
        job: ActiveJob,
        continuation: Continuation | None = None,
        trace_context: Carrier = (),
    ) -> AsyncGenerator[NodeReport, None]:
        """Assigns ``job`` (its current epoch) to ``node`` and yields the node's reports
        until a final one (done, failed, lost, or queued too long); cancels the
        assignment unless the node finished it or is gone."""
        self._jobs[job.job_id] = job
        job.last_progress = job.assigned_at = time.monotonic()
        job.running = False
        node.active_jobs.add(job.job_id)
        node.outbox.put_nowait(
            AssignCommand(job.job_id, job.epoch, job.spec, continuation, trace_context)
        )
        finished = False
        try:
            while True:
                _, report = await job.reports.get()
                yield report
                if isinstance(report, QueueTimeout):
                    return  # still queued on the node: cancelled there below
                if isinstance(report, DoneReport | FailedReport | NodeLost):
                    finished = True
                    return
        finally:
            if self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]
            node.active_jobs.discard(job.job_id)
            if not finished and node.node_id in self._nodes:
                node.outbox.put_nowait(CancelCommand(job.job_id, job.epoch))


def _failure_error(report: FailedReport) -> Exception:
    if report.kind is FailureKind.INVALID_REQUEST:
        return InvalidArgument(report.message, field=report.param or "messages")
    if report.kind is FailureKind.MODEL_UNAVAILABLE:
        return NoCapacity(report.message)
    return JobFailed(report.message)


@dataclass(slots=True)
class _End:
    """How a job ended, for its record; until then, cancelled by its caller."""

    finished: bool = False
    outcome: JobOutcome = JobOutcome.CANCELLED
    detail: str = "cancelled by the caller"
