"""A job's messages: its assignment and cancellation (network to agent), the agent's
start, chunks and signed results (agent to network), and the dispatch stream's events
(network to cloud)."""

from __future__ import annotations

from collections.abc import Sequence

from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

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
from core.convert.catalog import price_from_pb, price_to_pb
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
from core.convert.requirements import requirements_to_pb
from core.inference import (
    Continuation,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobFinished,
    JobMigrated,
    JobOrigin,
    NodeRequirements,
    NodeUsage,
)

_FAILURE_TO_PB = {
    FailureKind.INVALID_REQUEST: agent_pb.JOB_FAILURE_REASON_INVALID_REQUEST,
    FailureKind.MODEL_UNAVAILABLE: agent_pb.JOB_FAILURE_REASON_MODEL_UNAVAILABLE,
    FailureKind.RUNTIME_ERROR: agent_pb.JOB_FAILURE_REASON_RUNTIME_ERROR,
}
_FAILURE_FROM_PB = {value: key for key, value in _FAILURE_TO_PB.items()}


# --- network to agent -------------------------------------------------------------


def continuation_to_pb(continuation: Continuation | None) -> agent_pb.Continuation | None:
    if continuation is None:
        return None
    return agent_pb.Continuation(
        text=continuation.text,
        token_count=continuation.token_count,
        token_ids=continuation.token_ids,
    )


def continuation_from_pb(continuation: agent_pb.Continuation) -> Continuation:
    return Continuation(continuation.text, continuation.token_count, tuple(continuation.token_ids))


def assign_to_pb(command: AssignCommand) -> agent_pb.AssignJob:
    return agent_pb.AssignJob(
        job_id=command.job_id,
        epoch=command.epoch,
        spec=spec_to_pb(command.spec),
        continuation=continuation_to_pb(command.continuation),
        trace_context=dict(command.trace_context),
    )


def assign_from_pb(assign: agent_pb.AssignJob) -> AssignCommand:
    """Raises InvalidArgument for a spec the domain cannot hold (a message without role)."""
    return AssignCommand(
        assign.job_id,
        assign.epoch,
        spec_from_pb(assign.spec),
        continuation_from_pb(assign.continuation) if assign.HasField("continuation") else None,
        tuple(sorted(assign.trace_context.items())),
    )


def cancel_to_pb(command: CancelCommand) -> agent_pb.CancelJob:
    return agent_pb.CancelJob(job_id=command.job_id, epoch=command.epoch)


def cancel_from_pb(cancel: agent_pb.CancelJob) -> CancelCommand:
    return CancelCommand(cancel.job_id, cancel.epoch)


# --- agent to network ---------------------------------------------------------------


def failure_to_pb(kind: FailureKind) -> agent_pb.JobFailureReason.ValueType:
    return _FAILURE_TO_PB[kind]


def started_to_pb(started: StartedReport) -> agent_pb.JobStarted:
    return agent_pb.JobStarted(job_id=started.job_id, epoch=started.epoch)


def started_from_pb(started: agent_pb.JobStarted) -> StartedReport:
    return StartedReport(started.job_id, started.epoch)


def waiting_to_pb(waiting: WaitingReport) -> agent_pb.JobWaiting:
    return agent_pb.JobWaiting(job_id=waiting.job_id, epoch=waiting.epoch)


def waiting_from_pb(waiting: agent_pb.JobWaiting) -> WaitingReport:
    return WaitingReport(waiting.job_id, waiting.epoch)


def fill_chunk(message: agent_pb.JobChunk, chunk: ChunkReport) -> None:
    """Writes ``chunk`` into ``message`` where it lies (in its ConnectRequest): no
    message is built only to be copied in."""
    message.job_id = chunk.job_id
    message.epoch = chunk.epoch
    message.text = chunk.text
    message.token_count = chunk.token_count
    message.prompt_tokens = chunk.prompt_tokens
    message.token_ids.extend(chunk.token_ids)
    if chunk.logprobs:
        message.logprobs.extend(logprobs_to_pb(chunk.logprobs))
    message.embedding.extend(chunk.embedding)


def chunk_from_pb(chunk: agent_pb.JobChunk) -> ChunkReport:
    return ChunkReport(
        chunk.job_id,
        chunk.epoch,
        chunk.text,
        chunk.token_count,
        chunk.prompt_tokens,
        tuple(chunk.token_ids),
        logprobs_from_pb(chunk.logprobs),
        tuple(chunk.embedding),
    )


def done_to_pb(done: DoneReport) -> agent_pb.JobDone:
    return agent_pb.JobDone(
        job_id=done.job_id,
        epoch=done.epoch,
        finish_reason=finish_reason_to_pb(done.finish_reason),
        usage=usage_to_pb(done.usage),
        signature=done.signature,
    )


def done_from_pb(done: agent_pb.JobDone) -> DoneReport:
    """Keeps the reason's wire number: the signature covers it as sent."""
    return DoneReport(
        done.job_id,
        done.epoch,
        finish_reason_from_pb(done.finish_reason),
        usage_from_pb(done.usage),
        done.signature,
        done.finish_reason,
    )


def failed_to_pb(failed: FailedReport) -> agent_pb.JobFailed:
    return agent_pb.JobFailed(
        job_id=failed.job_id,
        epoch=failed.epoch,
        reason=failure_to_pb(failed.kind),
        message=failed.message,
        usage=usage_to_pb(failed.usage),
        signature=failed.signature,
        param=failed.param,
    )


def failed_from_pb(failed: agent_pb.JobFailed) -> FailedReport:
    """An unknown reason counts as a runtime error; its wire number is kept for the
    signature."""
    return FailedReport(
        failed.job_id,
        failed.epoch,
        _FAILURE_FROM_PB.get(failed.reason, FailureKind.RUNTIME_ERROR),
        failed.message,
        usage_from_pb(failed.usage),
        failed.signature,
        failed.reason,
        failed.param,
    )


# --- the dispatch stream (network to cloud) ---------------------------------------------


def origin_to_pb(origin: JobOrigin) -> dispatch_pb.JobOrigin:
    return dispatch_pb.JobOrigin(
        request_id=origin.request_id,
        account_id=origin.account_id,
        subcloud_id=origin.subcloud_id,
        price=price_to_pb(origin.price),
    )


def origin_from_pb(message: dispatch_pb.JobOrigin) -> JobOrigin:
    return JobOrigin(
        message.request_id, message.account_id, message.subcloud_id, price_from_pb(message.price)
    )


def run_job_request_to_pb(
    job_id: str,
    spec: GenerationSpec,
    requirements: NodeRequirements,
    origin: JobOrigin,
    *,
    batch_events: bool = False,
) -> dispatch_pb.RunJobRequest:
    return dispatch_pb.RunJobRequest(
        job_id=job_id,
        spec=spec_to_pb(spec),
        requirements=requirements_to_pb(requirements),
        origin=origin_to_pb(origin),
        batch_events=batch_events,
    )


def _node_usage_to_pb(share: NodeUsage) -> dispatch_pb.NodeUsage:
    return dispatch_pb.NodeUsage(
        node_id=share.node_id,
        usage=usage_to_pb(share.usage),
        operator_account_id=share.operator_account_id,
    )


def job_event_to_pb(event: JobEvent) -> dispatch_pb.RunJobResponse:
    if isinstance(event, JobDelta):
        # Written in place: the stream's commonest message builds nothing to copy.
        response = dispatch_pb.RunJobResponse()
        delta = response.delta
        delta.text = event.text
        delta.token_count = event.token_count
        delta.prompt_tokens = event.prompt_tokens
        if event.logprobs:
            delta.logprobs.extend(logprobs_to_pb(event.logprobs))
        delta.embedding.extend(event.embedding)
        return response
    if isinstance(event, JobAssigned):
        return dispatch_pb.RunJobResponse(assigned=dispatch_pb.JobAssigned(node_id=event.node_id))
    if isinstance(event, JobMigrated):
        return dispatch_pb.RunJobResponse(
            migrated=dispatch_pb.JobMigrated(
                node_id=event.node_id, epoch=event.epoch, reason=event.reason
            )
        )
    return dispatch_pb.RunJobResponse(
        finished=dispatch_pb.JobFinished(
            finish_reason=finish_reason_to_pb(event.finish_reason),
            usage=usage_to_pb(event.usage),
            node_usage=[_node_usage_to_pb(share) for share in event.node_usage],
        )
    )


def job_events_to_pb(events: Sequence[JobEvent]) -> dispatch_pb.RunJobResponse:
    """Events ready together, as one message (RunJobResponse.batch)."""
    return dispatch_pb.RunJobResponse(
        batch=dispatch_pb.JobEvents(events=[job_event_to_pb(event) for event in events])
    )


def job_events_from_pb(response: dispatch_pb.RunJobResponse) -> list[JobEvent]:
    """The events of one message, in order: itself, or those of its batch (a batch in
    a batch, like an event this side does not know, gives nothing)."""
    if response.WhichOneof("event") == "batch":
        events = (job_event_from_pb(event) for event in response.batch.events)
        return [event for event in events if event is not None]
    event = job_event_from_pb(response)
    return [] if event is None else [event]


def job_event_from_pb(response: dispatch_pb.RunJobResponse) -> JobEvent | None:
    """None for an event this side does not know (a newer network's)."""
    kind = response.WhichOneof("event")
    if kind == "delta":
        delta = response.delta
        return JobDelta(
            delta.text,
            delta.token_count,
            delta.prompt_tokens,
            logprobs_from_pb(delta.logprobs),
            tuple(delta.embedding),
        )
    if kind == "assigned":
        return JobAssigned(response.assigned.node_id)
    if kind == "migrated":
        migrated = response.migrated
        return JobMigrated(migrated.node_id, migrated.epoch, migrated.reason)
    if kind == "finished":
        finished = response.finished
        return JobFinished(
            finish_reason_from_pb(finished.finish_reason),
            usage_from_pb(finished.usage),
            tuple(
                NodeUsage(share.node_id, usage_from_pb(share.usage), share.operator_account_id)
                for share in finished.node_usage
            ),
        )
    return None
