"""Conversions of ReplicaService messages: forwarded assignments, node reports, and
operators' actions on nodes and their outcomes."""

from __future__ import annotations

from resultity.network.v1 import replica_service_pb2 as pb

from core.agent_messages import (
    ChunkReport,
    DoneReport,
    FailedReport,
    FailureKind,
    StartedReport,
    WaitingReport,
)
from core.convert.generation import (
    finish_reason_from_pb,
    finish_reason_to_pb,
    logprobs_from_pb,
    logprobs_to_pb,
    spec_from_pb,
    spec_to_pb,
    usage_from_pb,
    usage_to_pb,
)
from core.errors import InvalidArgument
from core.inference import Continuation
from server.network.convert import state_from_pb, state_to_pb
from server.network.forwarding import Assignment
from server.network.jobs import NodeLost, NodeReport, QueueTimeout
from server.network.node_actions import ActionOutcome, Drain, NodeAction, Quarantine, Release

_FAILURE_TO_PB = {
    FailureKind.INVALID_REQUEST: pb.FORWARDED_FAILURE_INVALID_REQUEST,
    FailureKind.MODEL_UNAVAILABLE: pb.FORWARDED_FAILURE_MODEL_UNAVAILABLE,
    FailureKind.RUNTIME_ERROR: pb.FORWARDED_FAILURE_RUNTIME_ERROR,
}
_FAILURE_FROM_PB = {value: kind for kind, value in _FAILURE_TO_PB.items()}


def assignment_to_pb(assignment: Assignment) -> pb.RunForwardedJobRequest:
    request = pb.RunForwardedJobRequest(
        job_id=assignment.job_id,
        epoch=assignment.epoch,
        node_id=assignment.node_id,
        spec=spec_to_pb(assignment.spec),
    )
    if assignment.continuation is not None:
        continuation = assignment.continuation
        request.continuation.CopyFrom(
            pb.ForwardedContinuation(
                text=continuation.text,
                token_count=continuation.token_count,
                token_ids=continuation.token_ids,
            )
        )
    return request


def assignment_from_pb(request: pb.RunForwardedJobRequest) -> Assignment:
    continuation = None
    if request.HasField("continuation"):
        given = request.continuation
        continuation = Continuation(given.text, given.token_count, tuple(given.token_ids))
    return Assignment(
        request.job_id, request.epoch, request.node_id, spec_from_pb(request.spec), continuation
    )


def report_to_pb(report: NodeReport) -> pb.RunForwardedJobResponse:
    if isinstance(report, StartedReport):
        return pb.RunForwardedJobResponse(started=pb.ForwardedStarted())
    if isinstance(report, WaitingReport):
        return pb.RunForwardedJobResponse(waiting=pb.ForwardedWaiting())
    if isinstance(report, ChunkReport):
        return pb.RunForwardedJobResponse(
            chunk=pb.ForwardedChunk(
                text=report.text,
                token_count=report.token_count,
                prompt_tokens=report.prompt_tokens,
                token_ids=report.token_ids,
                logprobs=logprobs_to_pb(report.logprobs),
                embedding=report.embedding,
            )
        )
    if isinstance(report, DoneReport):
        return pb.RunForwardedJobResponse(
            done=pb.ForwardedDone(
                finish_reason=finish_reason_to_pb(report.finish_reason),
                usage=usage_to_pb(report.usage),
            )
        )
    if isinstance(report, FailedReport):
        return pb.RunForwardedJobResponse(
            failed=pb.ForwardedFailed(
                reason=_FAILURE_TO_PB[report.kind],
                message=report.message,
                usage=usage_to_pb(report.usage),
                param=report.param,
            )
        )
    if isinstance(report, QueueTimeout):
        return pb.RunForwardedJobResponse(
            queue_timeout=pb.ForwardedQueueTimeout(waited_s=report.waited_s)
        )
    return pb.RunForwardedJobResponse(lost=pb.ForwardedLost(reason=report.reason))


def report_from_pb(response: pb.RunForwardedJobResponse, job_id: str, epoch: int) -> NodeReport:
    """A report of the assignment of ``job_id`` under ``epoch``, which the stream is for."""
    kind = response.WhichOneof("event")
    if kind == "started":
        return StartedReport(job_id, epoch)
    if kind == "waiting":
        return WaitingReport(job_id, epoch)
    if kind == "chunk":
        chunk = response.chunk
        return ChunkReport(
            job_id,
            epoch,
            chunk.text,
            chunk.token_count,
            chunk.prompt_tokens,
            tuple(chunk.token_ids),
            logprobs_from_pb(chunk.logprobs),
            tuple(chunk.embedding),
        )
    if kind == "done":
        return DoneReport(
            job_id,
            epoch,
            finish_reason_from_pb(response.done.finish_reason),
            usage_from_pb(response.done.usage),
        )
    if kind == "failed":
        failed = response.failed
        return FailedReport(
            job_id,
            epoch,
            _FAILURE_FROM_PB.get(failed.reason, FailureKind.RUNTIME_ERROR),
            failed.message,
            usage_from_pb(failed.usage),
            param=failed.param,
        )
    if kind == "queue_timeout":
        return QueueTimeout(response.queue_timeout.waited_s, epoch)
    return NodeLost(response.lost.reason or "lost by its replica", epoch)


def action_to_pb(node_id: str, action: NodeAction) -> pb.AdministerNodeRequest:
    if isinstance(action, Drain):
        return pb.AdministerNodeRequest(node_id=node_id, drain=pb.NodeDrain())
    if isinstance(action, Quarantine):
        return pb.AdministerNodeRequest(
            node_id=node_id, quarantine=pb.NodeQuarantine(reason=action.reason)
        )
    return pb.AdministerNodeRequest(node_id=node_id, release=pb.NodeRelease())


def action_from_pb(request: pb.AdministerNodeRequest) -> NodeAction:
    kind = request.WhichOneof("action")
    if kind == "drain":
        return Drain()
    if kind == "quarantine":
        return Quarantine(request.quarantine.reason)
    if kind == "release":
        return Release()
    raise InvalidArgument("an action (drain, quarantine or release) is required", field="action")


def outcome_to_pb(outcome: ActionOutcome) -> pb.AdministerNodeResponse:
    if outcome.state is None:
        return pb.AdministerNodeResponse()
    return pb.AdministerNodeResponse(
        connected=True,
        state=state_to_pb(outcome.state),
        quarantine_reason=outcome.quarantine_reason,
        reputation=outcome.reputation,
    )


def outcome_from_pb(response: pb.AdministerNodeResponse) -> ActionOutcome:
    if not response.connected:
        return ActionOutcome(None)
    return ActionOutcome(
        state_from_pb(response.state), response.quarantine_reason, response.reputation
    )
