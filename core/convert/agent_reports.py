"""What an agent sends on its stream after its hello: heartbeats, draining, applied
configuration, and its jobs' starts, chunks and signed results (job_events.py)."""

from __future__ import annotations

from collections.abc import Sequence

from resultity.agent.v1 import agent_service_pb2 as pb

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
from core.convert.job_events import (
    chunk_from_pb,
    done_from_pb,
    done_to_pb,
    failed_from_pb,
    failed_to_pb,
    fill_chunk,
    started_from_pb,
    started_to_pb,
    waiting_from_pb,
    waiting_to_pb,
)
from core.errors import ProtocolViolation
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES


def heartbeat_to_pb(beat: Heartbeat) -> pb.Heartbeat:
    return pb.Heartbeat(
        active_jobs=beat.active_jobs,
        queued_jobs=beat.queued_jobs,
        recent_tokens_per_second=beat.recent_tokens_per_second,
        free_memory_bytes=beat.free_memory_bytes,
        cached_prefixes=beat.cached_prefixes,
    )


def heartbeat_from_pb(beat: pb.Heartbeat) -> Heartbeat:
    """Keeps the first MAX_ADVERTISED_PREFIXES fingerprints (the newest): a node's
    list is stored and scanned on routing decisions, so it may not grow with what
    a node sends."""
    return Heartbeat(
        beat.active_jobs,
        beat.queued_jobs,
        beat.recent_tokens_per_second,
        beat.free_memory_bytes,
        tuple(beat.cached_prefixes[:MAX_ADVERTISED_PREFIXES]),
    )


def report_to_pb(report: AgentReport) -> pb.ConnectRequest:
    # Chunks first: they are nearly every message.
    if isinstance(report, ChunkReport):
        request = pb.ConnectRequest()
        fill_chunk(request.job_chunk, report)
        return request
    if isinstance(report, StartedReport):
        return pb.ConnectRequest(job_started=started_to_pb(report))
    if isinstance(report, WaitingReport):
        return pb.ConnectRequest(job_waiting=waiting_to_pb(report))
    if isinstance(report, Heartbeat):
        return pb.ConnectRequest(heartbeat=heartbeat_to_pb(report))
    if isinstance(report, DoneReport):
        return pb.ConnectRequest(job_done=done_to_pb(report))
    if isinstance(report, FailedReport):
        return pb.ConnectRequest(job_failed=failed_to_pb(report))
    if isinstance(report, ConfigApplied):
        return pb.ConnectRequest(config_applied=pb.ConfigApplied(version=report.version))
    return pb.ConnectRequest(draining=pb.Draining())


def batch_to_pb(requests: Sequence[pb.ConnectRequest]) -> pb.ConnectRequest:
    """Reports that were ready together, as one message (agent ReportBatch)."""
    return pb.ConnectRequest(batch=pb.ReportBatch(reports=requests))


def reports_from_pb(request: pb.ConnectRequest) -> Sequence[AgentReport]:
    """The reports of one message, in order: itself, or those of its batch. Raises
    ProtocolViolation for anything but reports (a second hello, a batch in a batch)."""
    if request.WhichOneof("message") == "batch":
        return [report_from_pb(report) for report in request.batch.reports]
    return (report_from_pb(request),)


def report_from_pb(request: pb.ConnectRequest) -> AgentReport:
    """Raises ProtocolViolation for anything but a report (a second hello, a batch)."""
    kind = request.WhichOneof("message")
    if kind == "job_chunk":
        return chunk_from_pb(request.job_chunk)
    if kind == "job_started":
        return started_from_pb(request.job_started)
    if kind == "job_waiting":
        return waiting_from_pb(request.job_waiting)
    if kind == "heartbeat":
        return heartbeat_from_pb(request.heartbeat)
    if kind == "job_done":
        return done_from_pb(request.job_done)
    if kind == "job_failed":
        return failed_from_pb(request.job_failed)
    if kind == "config_applied":
        return ConfigApplied(request.config_applied.version)
    if kind == "draining":
        return Draining()
    raise ProtocolViolation(f"unexpected message in session: {kind}")
