"""gRPC transport of the network layer: thin conversions around NetworkService.

The agent stream (authenticated by its signed hello) and the dispatch API
(the platform's service token); the node admin API is in admin_servicer.py. A job
runs the same path whether it came in its own RunJob call or on a RunJobs stream
(job_streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import structlog
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core import tracing
from core.convert.agent_reports import reports_from_pb
from core.convert.catalog import models_to_pb
from core.convert.generation import spec_from_pb
from core.convert.job_events import job_event_to_pb, job_events_to_pb, origin_from_pb
from core.convert.job_records import query_from_pb, record_to_pb
from core.convert.requirements import requirements_from_pb
from core.errors import DomainError, ProtocolViolation, SessionEnded
from core.grpc_errors import abort_with_error, translate_errors
from core.grpc_metrics import GrpcCalls
from core.inference import (
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobFinished,
    JobMigrated,
)
from core.job_streams import ACCEPTED, ACCEPTED_HEADER, RUN_JOB_METHOD
from server.network.callers import ServiceCallers, service_only
from server.network.convert import (
    challenge_to_pb,
    command_to_pb,
    signed_hello_from_pb,
    welcome_to_pb,
)
from server.network.job_streams import serve_jobs
from server.network.nodes import DisconnectCommand, NodeSession, ReconnectCommand, SignedHello
from server.network.service import NetworkService

log = structlog.get_logger(__name__)

Requests = AsyncIterator[agent_pb.ConnectRequest]
AgentContext = grpc.aio.ServicerContext[agent_pb.ConnectRequest, agent_pb.ConnectResponse]


async def _opening(requests: Requests) -> SignedHello | None:
    first = await anext(aiter(requests), None)
    return None if first is None else signed_hello_from_pb(first)


class AgentServicer(agent_grpc.AgentServiceServicer):
    def __init__(self, service: NetworkService) -> None:
        self._service = service

    async def Connect(
        self, request_iterator: Requests, context: AgentContext
    ) -> AsyncIterator[agent_pb.ConnectResponse]:
        nonce = self._service.challenge()
        yield challenge_to_pb(nonce, self._service.admission.settings.network_id)
        try:
            node = await self._service.join(nonce, _opening(request_iterator))
        except DomainError as error:
            await abort_with_error(context, error)
        if node is None:
            return
        yield welcome_to_pb(node.node_id, self._service.liveness, self._service.failover)
        # This stream's task and its reader log the node's id.
        structlog.contextvars.bind_contextvars(node_id=node.node_id)
        reader = asyncio.create_task(self._read(node, request_iterator), name="agent-reader")
        try:
            async for response in self._commands(node, reader, context):
                yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            self._service.disconnect(node, "stream closed")

    async def _commands(
        self, node: NodeSession, reader: asyncio.Task[None], context: AgentContext
    ) -> AsyncIterator[agent_pb.ConnectResponse]:
        """The node's commands until its session ends: a reconnect is the last one sent;
        a disconnect aborts the stream with its error, unless the agent ended it."""
        while True:
            command = await node.outbox.get()
            if isinstance(command, DisconnectCommand):
                if not reader.done():
                    await abort_with_error(context, command.error or SessionEnded(command.reason))
                return
            yield command_to_pb(command)
            if isinstance(command, ReconnectCommand):
                return

    async def _read(self, node: NodeSession, requests: Requests) -> None:
        reason = "agent closed the stream"
        try:
            async for request in requests:
                for report in reports_from_pb(request):
                    self._service.handle(node, report)
        except ProtocolViolation as error:
            reason = f"protocol violation: {error.message}"
        except grpc.aio.AioRpcError as error:
            reason = f"stream broken: {error.code().name}"
        finally:
            self._service.disconnect(node, reason)


class DispatchServicer(dispatch_grpc.DispatchServiceServicer):
    def __init__(self, service: NetworkService, callers: ServiceCallers, calls: GrpcCalls) -> None:
        self._service = service
        self.callers = callers
        self._calls = calls

    @translate_errors
    @service_only
    async def RunJob(
        self,
        request: dispatch_pb.RunJobRequest,
        context: grpc.aio.ServicerContext[dispatch_pb.RunJobRequest, dispatch_pb.RunJobResponse],
    ) -> AsyncIterator[dispatch_pb.RunJobResponse]:
        async for response in self._job(request):
            yield response

    @translate_errors
    @service_only
    async def RunJobs(
        self,
        request_iterator: AsyncIterator[dispatch_pb.RunJobsRequest],
        context: grpc.aio.ServicerContext[dispatch_pb.RunJobsRequest, dispatch_pb.RunJobsResponse],
    ) -> AsyncIterator[dispatch_pb.RunJobsResponse]:
        await context.send_initial_metadata(((ACCEPTED_HEADER, ACCEPTED),))
        async for response in serve_jobs(request_iterator, self._streamed_job):
            yield response

    async def _streamed_job(
        self, request: dispatch_pb.RunJobRequest
    ) -> AsyncGenerator[dispatch_pb.RunJobResponse, None]:
        """A job of RunJobs, under the span its RunJob call would have had, and counted
        as that call (jobs per second and their outcomes stay in the gRPC metrics)."""
        with (
            tracing.stream_server_span(RUN_JOB_METHOD, request.trace_context),
            self._calls.call(RUN_JOB_METHOD),
        ):
            async for response in self._job(request):
                yield response

    async def _job(
        self, request: dispatch_pb.RunJobRequest
    ) -> AsyncGenerator[dispatch_pb.RunJobResponse, None]:
        """One job's responses, a RunJob call's or a job's of RunJobs; closing the
        generator early cancels the job."""
        spec = spec_from_pb(request.spec)
        origin = origin_from_pb(request.origin)
        structlog.contextvars.bind_contextvars(
            job_id=request.job_id, request_id=origin.request_id or None
        )
        events = self._service.run_job(
            request.job_id, spec, requirements_from_pb(request.requirements), origin
        )
        traced = tracing.enabled()
        if traced:
            tracing.annotate(_job_attributes(request.job_id, spec))
        try:
            async for ready in events:
                if traced:
                    for event in ready:
                        if not isinstance(event, JobDelta):
                            tracing.annotate(_event_attributes(event))
                if len(ready) > 1 and request.batch_events:
                    yield job_events_to_pb(ready)
                else:
                    for event in ready:
                        yield job_event_to_pb(event)
        finally:
            # Runs the job's own cleanup (cancel on the node) even when the caller went away.
            await events.aclose()

    @translate_errors
    @service_only
    async def ListModels(
        self,
        request: dispatch_pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[
            dispatch_pb.ListModelsRequest, dispatch_pb.ListModelsResponse
        ],
    ) -> dispatch_pb.ListModelsResponse:
        return models_to_pb(self._service.models(requirements_from_pb(request.requirements)))

    @translate_errors
    @service_only
    async def GetJobRecords(
        self,
        request: dispatch_pb.GetJobRecordsRequest,
        context: grpc.aio.ServicerContext[
            dispatch_pb.GetJobRecordsRequest, dispatch_pb.GetJobRecordsResponse
        ],
    ) -> dispatch_pb.GetJobRecordsResponse:
        records = await self._service.job_records(list(request.job_ids))
        return dispatch_pb.GetJobRecordsResponse(records=[record_to_pb(r) for r in records])

    @translate_errors
    @service_only
    async def ListJobRecords(
        self,
        request: dispatch_pb.ListJobRecordsRequest,
        context: grpc.aio.ServicerContext[
            dispatch_pb.ListJobRecordsRequest, dispatch_pb.ListJobRecordsResponse
        ],
    ) -> dispatch_pb.ListJobRecordsResponse:
        records, next_token = await self._service.list_job_records(
            query_from_pb(request.filter), request.page_size, request.page_token
        )
        return dispatch_pb.ListJobRecordsResponse(
            records=[record_to_pb(r) for r in records], next_page_token=next_token
        )


def _job_attributes(job_id: str, spec: GenerationSpec) -> tracing.Attributes:
    return {
        tracing.GEN_AI_OPERATION: "embeddings" if spec.embed else "chat",
        tracing.GEN_AI_PROVIDER: tracing.PROVIDER,
        tracing.GEN_AI_REQUEST_MODEL: spec.model,
        tracing.GEN_AI_REQUEST_MAX_TOKENS: spec.sampling.max_tokens,
        "resultity.job.id": job_id,
    }


def _event_attributes(event: JobEvent) -> tracing.Attributes:
    """What a job's event adds to the RunJob span (its node, its usage)."""
    if isinstance(event, JobAssigned):
        return {"resultity.node.id": event.node_id}
    if isinstance(event, JobMigrated):
        return {"resultity.node.id": event.node_id, "resultity.job.epoch": event.epoch}
    if isinstance(event, JobFinished):
        return {
            tracing.GEN_AI_INPUT_TOKENS: event.usage.prompt_tokens,
            tracing.GEN_AI_OUTPUT_TOKENS: event.usage.completion_tokens,
            tracing.GEN_AI_FINISH_REASONS: (event.finish_reason.value,),
        }
    return {}
