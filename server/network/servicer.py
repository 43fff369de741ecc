"""gRPC transport of the network layer: thin conversions around NetworkService.

The agent stream (authenticated by its signed hello) and the dispatch API
(the platform's service token); the node admin API is in admin_servicer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog
from google.protobuf.message import DecodeError
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from core.errors import (
    DomainError,
    InvalidNodeCredentials,
    ProtocolViolation,
    SessionEnded,
)
from core.grpc_errors import abort_with_error, translate_errors
from core.inference import JobAssigned, JobDelta, JobMigrated
from core.inference_proto import (
    finish_reason_from_pb,
    finish_reason_to_pb,
    logprobs_from_pb,
    logprobs_to_pb,
    origin_from_pb,
    origin_to_pb,
    price_to_pb,
    requirements_from_pb,
    spec_from_pb,
    usage_from_pb,
    usage_to_pb,
)
from server.network.callers import ServiceCallers, service_only
from server.network.convert import FAILURE_FROM_PB, command_to_pb, duration_to_pb, hello_from_pb
from server.network.job_records import JobOutcome, JobRecord
from server.network.jobs import (
    ChunkReport,
    DoneReport,
    FailedReport,
    FailureKind,
    StartedReport,
)
from server.network.nodes import (
    DisconnectCommand,
    NodeCommand,
    NodeSession,
    ReconnectCommand,
)
from server.network.service import NetworkService

log = structlog.get_logger(__name__)


class AgentServicer(agent_grpc.AgentServiceServicer):
    def __init__(self, service: NetworkService) -> None:
        self._service = service

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb.ConnectRequest],
        context: grpc.aio.ServicerContext[agent_pb.ConnectRequest, agent_pb.ConnectResponse],
    ) -> AsyncIterator[agent_pb.ConnectResponse]:
        nonce = self._service.challenge()
        yield agent_pb.ConnectResponse(
            challenge=agent_pb.Challenge(
                nonce=nonce, network_id=self._service.admission.settings.network_id
            )
        )
        try:
            async with asyncio.timeout(self._service.admission.settings.hello_timeout_s):
                first = await anext(aiter(request_iterator), None)
        except TimeoutError:
            # A stream that never says who it is would hold its slot forever.
            self._service.admission.withdraw(nonce)
            await abort_with_error(context, SessionEnded("no signed hello in time"))
        if first is None:
            self._service.admission.withdraw(nonce)
            return
        if first.WhichOneof("message") != "signed_hello":
            self._service.admission.withdraw(nonce)
            await abort_with_error(
                context,
                InvalidNodeCredentials("the first message of a session must be a signed hello"),
            )
        signed = first.signed_hello
        try:
            hello = agent_pb.Hello.FromString(signed.hello)
        except DecodeError:
            self._service.admission.withdraw(nonce)
            await abort_with_error(context, InvalidNodeCredentials("the signed hello is malformed"))
        try:
            node = await self._service.register(
                hello_from_pb(hello), signed.hello, signed.signature, nonce
            )
        except DomainError as error:
            await abort_with_error(context, error)
        liveness = self._service.liveness
        yield agent_pb.ConnectResponse(
            welcome=agent_pb.Welcome(
                node_id=node.node_id,
                heartbeat_interval=duration_to_pb(liveness.heartbeat_interval_s),
                heartbeat_timeout=duration_to_pb(liveness.heartbeat_timeout_s),
            )
        )
        reader = asyncio.create_task(self._read(node, request_iterator), name="agent-reader")
        try:
            while True:
                command: NodeCommand = await node.outbox.get()
                if isinstance(command, ReconnectCommand):
                    yield agent_pb.ConnectResponse(
                        reconnect=agent_pb.Reconnect(reason=command.reason)
                    )
                    return
                if isinstance(command, DisconnectCommand):
                    if reader.done():
                        return  # the agent ended the stream itself
                    await abort_with_error(context, command.error or SessionEnded(command.reason))
                yield command_to_pb(command)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            self._service.disconnect(node, "stream closed")

    async def _read(
        self, node: NodeSession, requests: AsyncIterator[agent_pb.ConnectRequest]
    ) -> None:
        reason = "agent closed the stream"
        try:
            async for request in requests:
                self._handle(node, request)
        except ProtocolViolation as error:
            reason = f"protocol violation: {error.message}"
        except grpc.aio.AioRpcError as error:
            reason = f"stream broken: {error.code().name}"
        finally:
            self._service.disconnect(node, reason)

    def _handle(self, node: NodeSession, request: agent_pb.ConnectRequest) -> None:
        kind = request.WhichOneof("message")
        if kind == "heartbeat":
            beat = request.heartbeat
            self._service.heartbeat(
                node,
                active=beat.active_jobs,
                queued=beat.queued_jobs,
                tokens_per_second=beat.recent_tokens_per_second,
                free_memory_bytes=beat.free_memory_bytes,
            )
        elif kind == "draining":
            self._service.draining(node)
        elif kind == "config_applied":
            self._service.config_applied(node, request.config_applied.version)
        elif kind == "job_started":
            started = request.job_started
            self._service.report(node, started.job_id, started.epoch, StartedReport())
        elif kind == "job_chunk":
            chunk = request.job_chunk
            report = ChunkReport(
                chunk.text,
                chunk.token_count,
                chunk.prompt_tokens,
                tuple(chunk.token_ids),
                logprobs_from_pb(chunk.logprobs),
                tuple(chunk.embedding),
            )
            self._service.report(node, chunk.job_id, chunk.epoch, report)
        elif kind == "job_done":
            done = request.job_done
            self._service.report(
                node,
                done.job_id,
                done.epoch,
                DoneReport(
                    finish_reason_from_pb(done.finish_reason),
                    usage_from_pb(done.usage),
                    done.signature,
                    done.finish_reason,
                ),
            )
        elif kind == "job_failed":
            failed = request.job_failed
            failure = FailedReport(
                FAILURE_FROM_PB.get(failed.reason, FailureKind.RUNTIME_ERROR),
                failed.message,
                usage_from_pb(failed.usage),
                failed.signature,
                failed.reason,
                failed.param,
            )
            self._service.report(node, failed.job_id, failed.epoch, failure)
        else:
            raise ProtocolViolation(f"unexpected message in session: {kind}")


class DispatchServicer(dispatch_grpc.DispatchServiceServicer):
    def __init__(self, service: NetworkService, callers: ServiceCallers) -> None:
        self._service = service
        self.callers = callers

    @translate_errors
    @service_only
    async def RunJob(
        self,
        request: dispatch_pb.RunJobRequest,
        context: grpc.aio.ServicerContext[dispatch_pb.RunJobRequest, dispatch_pb.RunJobResponse],
    ) -> AsyncIterator[dispatch_pb.RunJobResponse]:
        events = self._service.run_job(
            request.job_id,
            spec_from_pb(request.spec),
            requirements_from_pb(request.requirements),
            origin_from_pb(request.origin),
        )
        try:
            async for event in events:
                if isinstance(event, JobAssigned):
                    yield dispatch_pb.RunJobResponse(
                        assigned=dispatch_pb.JobAssigned(node_id=event.node_id)
                    )
                elif isinstance(event, JobMigrated):
                    yield dispatch_pb.RunJobResponse(
                        migrated=dispatch_pb.JobMigrated(
                            node_id=event.node_id, epoch=event.epoch, reason=event.reason
                        )
                    )
                elif isinstance(event, JobDelta):
                    yield dispatch_pb.RunJobResponse(
                        delta=dispatch_pb.TokenDelta(
                            text=event.text,
                            token_count=event.token_count,
                            prompt_tokens=event.prompt_tokens,
                            logprobs=logprobs_to_pb(event.logprobs),
                            embedding=event.embedding,
                        )
                    )
                else:
                    yield dispatch_pb.RunJobResponse(
                        finished=dispatch_pb.JobFinished(
                            finish_reason=finish_reason_to_pb(event.finish_reason),
                            usage=usage_to_pb(event.usage),
                            node_usage=[
                                dispatch_pb.NodeUsage(
                                    node_id=share.node_id,
                                    usage=usage_to_pb(share.usage),
                                    operator_account_id=share.operator_account_id,
                                )
                                for share in event.node_usage
                            ],
                        )
                    )
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
        return dispatch_pb.ListModelsResponse(
            models=[
                dispatch_pb.CatalogModel(
                    id=model.id,
                    owned_by=model.owned_by,
                    price=price_to_pb(model.price),
                    context_length=model.context_length,
                    chat_template_overhead_tokens=model.chat_template_overhead_tokens,
                    ready_nodes=model.ready_nodes,
                )
                for model in self._service.models(requirements_from_pb(request.requirements))
            ]
        )

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
        return dispatch_pb.GetJobRecordsResponse(records=[_record_to_pb(r) for r in records])


_OUTCOME_TO_PB = {
    JobOutcome.RUNNING: dispatch_pb.JOB_OUTCOME_RUNNING,
    JobOutcome.FINISHED: dispatch_pb.JOB_OUTCOME_FINISHED,
    JobOutcome.FAILED: dispatch_pb.JOB_OUTCOME_FAILED,
    JobOutcome.CANCELLED: dispatch_pb.JOB_OUTCOME_CANCELLED,
}


def _record_to_pb(record: JobRecord) -> dispatch_pb.JobRecord:
    return dispatch_pb.JobRecord(
        job_id=record.job_id,
        origin=origin_to_pb(record.origin),
        model=record.model,
        assignments=[
            dispatch_pb.JobAssignment(
                node_id=a.node_id, epoch=a.epoch, operator_account_id=a.operator_account_id
            )
            for a in record.assignments
        ],
        usage=usage_to_pb(record.usage),
        outcome=_OUTCOME_TO_PB[record.outcome],
    )
