"""Conversions between the agent and node admin protocols and the network's types."""

from __future__ import annotations

from datetime import UTC

from google.protobuf import duration_pb2
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb

from core.inference_proto import price_from_pb, price_to_pb, spec_to_pb
from server.common.transport import timestamp_to_pb
from server.network.config import ConfigModel, NetworkConfig
from server.network.jobs import Continuation, FailureKind
from server.network.nodes import (
    AssignCommand,
    CancelCommand,
    ConfigCommand,
    ModelValidation,
    NodeCommand,
    NodeHello,
    NodeModel,
    NodeSession,
    NodeState,
)

FAILURE_FROM_PB = {
    agent_pb.JOB_FAILURE_REASON_INVALID_REQUEST: FailureKind.INVALID_REQUEST,
    agent_pb.JOB_FAILURE_REASON_MODEL_UNAVAILABLE: FailureKind.MODEL_UNAVAILABLE,
    agent_pb.JOB_FAILURE_REASON_RUNTIME_ERROR: FailureKind.RUNTIME_ERROR,
}


def hello_from_pb(hello: agent_pb.Hello) -> NodeHello:
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
        region=hello.region,
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


def duration_to_pb(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def config_to_pb(config: NetworkConfig) -> agent_pb.NetworkConfig:
    return agent_pb.NetworkConfig(
        version=config.version,
        heartbeat_interval=duration_to_pb(config.heartbeat_interval_s),
        heartbeat_timeout=duration_to_pb(config.heartbeat_timeout_s),
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
        connected_at=timestamp_to_pb(node.connected_at),
        last_heartbeat_at=timestamp_to_pb(node.last_heartbeat_at),
        state=_STATE_TO_PB[node.state(now, suspect_after_s)],
        free_memory_bytes=node.free_memory_bytes,
        operator_account_id=node.operator_account_id,
        config_version=node.config_version,
        quarantine_reason=node.standing.quarantine_reason,
        reputation=node.standing.reputation,
        region=node.region,
        verified=node.verified,
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


def command_to_pb(command: NodeCommand) -> agent_pb.ConnectResponse:
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
