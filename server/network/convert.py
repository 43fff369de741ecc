"""Conversions between the agent and node admin protocols and the network's types."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from resultity.agent.v1 import agent_service_pb2 as agent_pb
from resultity.network.v1 import node_admin_service_pb2 as admin_pb

from core.agent_messages import AssignCommand, CancelCommand
from core.convert.catalog import price_from_pb, price_to_pb
from core.convert.job_events import assign_to_pb, cancel_to_pb
from core.errors import InvalidNodeCredentials
from server.common.transport import timestamp_to_pb
from server.network.config import ConfigModel, NetworkConfig
from server.network.nodes import (
    ConfigCommand,
    ModelValidation,
    NodeCommand,
    NodeHello,
    NodeModel,
    NodeSession,
    NodeState,
    ReconnectCommand,
    SignedHello,
)
from server.network.remote_nodes import RemoteNode
from server.network.settings import FailoverSettings, LivenessSettings


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


def signed_hello_from_pb(request: agent_pb.ConnectRequest) -> SignedHello:
    """A session's first message; anything but a well-formed signed hello is refused."""
    if request.WhichOneof("message") != "signed_hello":
        raise InvalidNodeCredentials("the first message of a session must be a signed hello")
    signed = request.signed_hello
    try:
        hello = agent_pb.Hello.FromString(signed.hello)
    except DecodeError:
        raise InvalidNodeCredentials("the signed hello is malformed") from None
    return SignedHello(hello_from_pb(hello), signed.hello, signed.signature)


def challenge_to_pb(nonce: bytes, network_id: str) -> agent_pb.ConnectResponse:
    return agent_pb.ConnectResponse(
        challenge=agent_pb.Challenge(nonce=nonce, network_id=network_id)
    )


def welcome_to_pb(
    node_id: str, liveness: LivenessSettings, failover: FailoverSettings
) -> agent_pb.ConnectResponse:
    return agent_pb.ConnectResponse(
        welcome=agent_pb.Welcome(
            node_id=node_id,
            heartbeat_interval=duration_to_pb(liveness.heartbeat_interval_s),
            heartbeat_timeout=duration_to_pb(liveness.heartbeat_timeout_s),
            stall_timeout=duration_to_pb(failover.stall_timeout_s),
        )
    )


_STATE_TO_PB = {
    NodeState.READY: admin_pb.NODE_STATE_READY,
    NodeState.SUSPECT: admin_pb.NODE_STATE_SUSPECT,
    NodeState.DRAINING: admin_pb.NODE_STATE_DRAINING,
    NodeState.QUARANTINED: admin_pb.NODE_STATE_QUARANTINED,
    NodeState.VALIDATING: admin_pb.NODE_STATE_VALIDATING,
}
_STATE_FROM_PB = {value: state for state, value in _STATE_TO_PB.items()}

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


def state_to_pb(state: NodeState) -> admin_pb.NodeState.ValueType:
    return _STATE_TO_PB[state]


def state_from_pb(state: admin_pb.NodeState.ValueType) -> NodeState:
    # A state this replica does not know (a newer replica's): not routed to.
    return _STATE_FROM_PB.get(state, NodeState.SUSPECT)


def fleet_node_to_pb(
    node: NodeSession | RemoteNode, now: float, suspect_after_s: float, replica_id: str
) -> admin_pb.Node:
    """A node of this replica (``replica_id``) or, as presence describes it, another's."""
    if isinstance(node, RemoteNode):
        return remote_node_to_pb(node, now, suspect_after_s)
    return node_to_pb(node, now, suspect_after_s, replica_id)


def remote_node_to_pb(node: RemoteNode, now: float, suspect_after_s: float) -> admin_pb.Node:
    """What the presence record carries (see the Node message)."""
    return admin_pb.Node(
        node_id=node.node_id,
        node_name=node.node_name,
        agent_version=node.agent_version,
        config_version=node.config_version,
        models=sorted(node.models),
        max_concurrent_jobs=node.max_concurrent_jobs,
        active_jobs=node.active_jobs,
        connected_at=timestamp_to_pb(datetime.fromtimestamp(node.connected_at, UTC)),
        state=_STATE_TO_PB[node.state(now, suspect_after_s)],
        operator_account_id=node.operator_account_id,
        quarantine_reason=node.standing.quarantine_reason,
        reputation=node.standing.reputation,
        region=node.region,
        verified=node.verified,
        replica_id=node.replica_id,
    )


def node_to_pb(
    node: NodeSession, now: float, suspect_after_s: float, replica_id: str
) -> admin_pb.Node:
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
        replica_id=replica_id,
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


def command_to_pb(command: NodeCommand) -> agent_pb.ConnectResponse:
    if isinstance(command, AssignCommand):
        return agent_pb.ConnectResponse(assign_job=assign_to_pb(command))
    if isinstance(command, ConfigCommand):
        return agent_pb.ConnectResponse(config=config_to_pb(command.config))
    if isinstance(command, CancelCommand):
        return agent_pb.ConnectResponse(cancel_job=cancel_to_pb(command))
    if isinstance(command, ReconnectCommand):
        return agent_pb.ConnectResponse(reconnect=agent_pb.Reconnect(reason=command.reason))
    raise TypeError(f"not a message for the agent: {command!r}")
