"""gRPC transport of the network layer: thin conversions around NetworkService."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC

import grpc
import structlog
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.agent.v1 import agent_service_pb2_grpc as agent_grpc
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from server.common.errors import (
    DomainError,
    InvalidNodeCredentials,
    ProtocolViolation,
    SessionEnded,
)
from server.common.grpc_errors import abort_with_error, translate_errors
from server.common.inference import JobAssigned, JobDelta, JobMigrated
from server.common.inference_proto import (
    finish_reason_from_pb,
    finish_reason_to_pb,
    logprobs_from_pb,
    logprobs_to_pb,
    price_from_pb,
    price_to_pb,
    spec_from_pb,
    spec_to_pb,
    usage_from_pb,
    usage_to_pb,
)
from server.network.config import ConfigModel, NetworkConfig
from server.network.jobs import (
    ChunkReport,
    Continuation,
    DoneReport,
    FailedReport,
    FailureKind,
)
from server.network.nodes import (
    AssignCommand,
    CancelCommand,
    ConfigCommand,
    DisconnectCommand,
    ModelValidation,
    NodeCommand,
    NodeHello,
    NodeModel,
    NodeSession,
    NodeState,
    ReconnectCommand,
)
from server.network.service import NetworkService

log = structlog.get_logger(__name__)

_FAILURE_FROM_PB = {
    agent_pb.JOB_FAILURE_REASON_INVALID_REQUEST: FailureKind.INVALID_REQUEST,
    agent_pb.JOB_FAILURE_REASON_MODEL_UNAVAILABLE: FailureKind.MODEL_UNAVAILABLE,
    agent_pb.JOB_FAILURE_REASON_RUNTIME_ERROR: FailureKind.RUNTIME_ERROR,
}


def _hello_from_pb(hello: agent_pb.Hello) -> NodeHello:
    return NodeHello(
        name=hello.node_name,
        agent_version=hello.agent_version,
        models=tuple(NodeModel(m.model, m.runtime, m.context_length) for m in hello.models),
        max_concurrent_jobs=hello.max_concurrent_jobs,
        public_key=hello.public_key,
        node_token=hello.node_token,
        nonce=hello.nonce,
        network_id=hello.network_id,
        signed_at=hello.signed_at.ToDatetime(UTC) if hello.HasField("signed_at") else None,
    )


_STATE_TO_PB = {
    NodeState.READY: admin_pb.NODE_STATE_READY,
    NodeState.SUSPECT: admin_pb.NODE_STATE_SUSPECT,
    NodeState.DRAINING: admin_pb.NODE_STATE_DRAINING,
    NodeState.QUARANTINED: admin_pb.NODE_STATE_QUARANTINED,
    NodeState.VALIDATING: admin_pb.NODE_STATE_VALIDATING,
}

_VALIDATION_TO_PB = {
    ModelValidation.PENDING: admin_pb.MODEL_VALIDATION_PENDING,
    ModelValidation.PASSED: admin_pb.MODEL_VALIDATION_PASSED,
    ModelValidation.FAILED: admin_pb.MODEL_VALIDATION_FAILED,
    # Served without validation (validation off): not passed, not failed.
    ModelValidation.UNCHECKED: admin_pb.MODEL_VALIDATION_UNSPECIFIED,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def config_to_pb(config: NetworkConfig) -> agent_pb.NetworkConfig:
    return agent_pb.NetworkConfig(
        version=config.version,
        heartbeat_interval=_duration(config.heartbeat_interval_s),
        heartbeat_timeout=_duration(config.heartbeat_timeout_s),
        min_agent_version=config.min_agent_version,
        canary_rate=config.canary_rate,
        models=[
            agent_pb.ConfigModel(
                model=m.model,
                price=price_to_pb(m.price),
                context_length=m.context_length,
                runtimes=list(m.runtimes),
            )
            for m in config.models
        ],
    )


def config_from_pb(config: agent_pb.NetworkConfig) -> NetworkConfig:
    return NetworkConfig(
        version=config.version,
        heartbeat_interval_s=config.heartbeat_interval.ToNanoseconds() / 1e9,
        heartbeat_timeout_s=config.heartbeat_timeout.ToNanoseconds() / 1e9,
        min_agent_version=config.min_agent_version,
        canary_rate=config.canary_rate,
        models=tuple(
            ConfigModel(m.model, price_from_pb(m.price), m.context_length, tuple(m.runtimes))
            for m in config.models
        ),
    )


def node_to_pb(node: NodeSession, now: float, suspect_after_s: float) -> admin_pb.Node:
    return admin_pb.Node(
        node_id=node.node_id,
        node_name=node.hello.name,
        agent_version=node.hello.agent_version,
        models=sorted(node.models),
        max_concurrent_jobs=node.hello.max_concurrent_jobs,
        active_jobs=len(node.active_jobs),
        connected_at=_timestamp(node.connected_at),
        last_heartbeat_at=_timestamp(node.last_heartbeat_at),
        state=_STATE_TO_PB[node.state(now, suspect_after_s)],
        free_memory_bytes=node.free_memory_bytes,
        operator_account_id=node.operator_account_id,
        config_version=node.config_version,
        quarantine_reason=node.quarantine_reason,
        reputation=node.reputation,
        model_status=[
            admin_pb.NodeModelStatus(
                model=model,
                validation=_VALIDATION_TO_PB[status.validation],
                time_to_first_token_ms=status.time_to_first_token_ms,
                tokens_per_second=status.tokens_per_second,
            )
            for model, status in sorted(node.model_status.items())
        ],
    )


def _continuation_to_pb(continuation: Continuation | None) -> agent_pb.Continuation | None:
    if continuation is None:
        return None
    return agent_pb.Continuation(
        text=continuation.text,
        token_count=continuation.token_count,
        token_ids=list(continuation.token_ids),
    )


def _command_to_pb(command: NodeCommand) -> agent_pb.ConnectResponse:
    if isinstance(command, AssignCommand):
        return agent_pb.ConnectResponse(
            assign_job=agent_pb.AssignJob(
                job_id=command.job_id,
                epoch=command.epoch,
                spec=spec_to_pb(command.spec),
                continuation=_continuation_to_pb(command.continuation),
            )
        )
    if isinstance(command, ConfigCommand):
        return agent_pb.ConnectResponse(config=config_to_pb(command.config))
    if isinstance(command, CancelCommand):
        return agent_pb.ConnectResponse(
            cancel_job=agent_pb.CancelJob(job_id=command.job_id, epoch=command.epoch)
        )
    raise TypeError(f"not a message for the agent: {command!r}")


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
        first = await anext(aiter(request_iterator), None)
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
                _hello_from_pb(hello), signed.hello, signed.signature, nonce
            )
        except DomainError as error:
            await abort_with_error(context, error)
        liveness = self._service.liveness
        interval, timeout = duration_pb2.Duration(), duration_pb2.Duration()
        interval.FromNanoseconds(int(liveness.heartbeat_interval_s * 1e9))
        timeout.FromNanoseconds(int(liveness.heartbeat_timeout_s * 1e9))
        yield agent_pb.ConnectResponse(
            welcome=agent_pb.Welcome(
                node_id=node.node_id, heartbeat_interval=interval, heartbeat_timeout=timeout
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
                yield _command_to_pb(command)
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
                _FAILURE_FROM_PB.get(failed.reason, FailureKind.RUNTIME_ERROR),
                failed.message,
                usage_from_pb(failed.usage),
                failed.signature,
                failed.reason,
            )
            self._service.report(node, failed.job_id, failed.epoch, failure)
        else:
            raise ProtocolViolation(f"unexpected message in session: {kind}")


class DispatchServicer(dispatch_grpc.DispatchServiceServicer):
    def __init__(self, service: NetworkService) -> None:
        self._service = service

    @translate_errors
    async def RunJob(
        self,
        request: dispatch_pb.RunJobRequest,
        context: grpc.aio.ServicerContext[dispatch_pb.RunJobRequest, dispatch_pb.RunJobResponse],
    ) -> AsyncIterator[dispatch_pb.RunJobResponse]:
        events = self._service.run_job(request.job_id, spec_from_pb(request.spec))
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
                for model in self._service.models()
            ]
        )


def _timestamp(value: object) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


class NodeAdminServicer(admin_grpc.NodeAdminServiceServicer):
    def __init__(self, service: NetworkService) -> None:
        self._service = service

    @translate_errors
    async def ListNodes(
        self,
        request: admin_pb.ListNodesRequest,
        context: grpc.aio.ServicerContext[admin_pb.ListNodesRequest, admin_pb.ListNodesResponse],
    ) -> admin_pb.ListNodesResponse:
        now = time.monotonic()
        suspect_after_s = self._service.liveness.suspect_s
        return admin_pb.ListNodesResponse(
            nodes=[node_to_pb(node, now, suspect_after_s) for node in self._service.nodes()]
        )

    def _node(self, node: NodeSession) -> admin_pb.Node:
        return node_to_pb(node, time.monotonic(), self._service.liveness.suspect_s)

    @translate_errors
    async def GetNode(
        self,
        request: admin_pb.GetNodeRequest,
        context: grpc.aio.ServicerContext[admin_pb.GetNodeRequest, admin_pb.GetNodeResponse],
    ) -> admin_pb.GetNodeResponse:
        return admin_pb.GetNodeResponse(node=self._node(self._service.node(request.node_id)))

    @translate_errors
    async def DrainNode(
        self,
        request: admin_pb.DrainNodeRequest,
        context: grpc.aio.ServicerContext[admin_pb.DrainNodeRequest, admin_pb.DrainNodeResponse],
    ) -> admin_pb.DrainNodeResponse:
        return admin_pb.DrainNodeResponse(
            node=self._node(self._service.drain_node(request.node_id))
        )

    @translate_errors
    async def QuarantineNode(
        self,
        request: admin_pb.QuarantineNodeRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.QuarantineNodeRequest, admin_pb.QuarantineNodeResponse
        ],
    ) -> admin_pb.QuarantineNodeResponse:
        node = self._service.quarantine(request.node_id, request.reason)
        return admin_pb.QuarantineNodeResponse(node=self._node(node))

    @translate_errors
    async def GetNetworkConfig(
        self,
        request: admin_pb.GetNetworkConfigRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.GetNetworkConfigRequest, admin_pb.GetNetworkConfigResponse
        ],
    ) -> admin_pb.GetNetworkConfigResponse:
        return admin_pb.GetNetworkConfigResponse(config=config_to_pb(self._service.config))

    @translate_errors
    async def UpdateNetworkConfig(
        self,
        request: admin_pb.UpdateNetworkConfigRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.UpdateNetworkConfigRequest, admin_pb.UpdateNetworkConfigResponse
        ],
    ) -> admin_pb.UpdateNetworkConfigResponse:
        config = self._service.update_config(
            config_from_pb(request.config), request.expected_version
        )
        return admin_pb.UpdateNetworkConfigResponse(config=config_to_pb(config))
