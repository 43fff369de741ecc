"""Forwarding over gRPC: runs an assignment through the replica owning its node
(ReplicaService.RunForwardedJob), and an operator's action on the node
(ReplicaService.AdministerNode), with the platform's service token."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from resultity.network.v1 import replica_service_pb2_grpc as pb_grpc

from core import channels
from core.grpc_errors import domain_error_from_rpc
from core.metadata import bearer_metadata
from core.replica_channels import unreachable
from server.network.forwarding import Assignment, ReplicaUnavailable
from server.network.jobs import NodeReport
from server.network.node_actions import ActionOutcome, NodeAction
from server.network.replica_convert import (
    action_to_pb,
    assignment_to_pb,
    outcome_from_pb,
    report_from_pb,
)

# How long an operator's action may wait for the replica holding the node: a
# replica that does not answer by then is reported unreachable.
ACTION_TIMEOUT_S = 10.0


class GrpcForwarder:
    """Implements forwarding.Forwarder and node_actions.NodeAdmin; keeps one channel
    per replica address."""

    def __init__(self, service_token: str, tls: channels.Tls = channels.PLAINTEXT) -> None:
        """``tls``: how to reach the other replicas (as this one's own clients do)."""
        self._metadata = bearer_metadata(service_token)
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, replica_address: str) -> pb_grpc.ReplicaServiceAsyncStub:
        channel = self._channels.get(replica_address)
        if channel is None:
            channel = self._channels[replica_address] = channels.channel(replica_address, self._tls)
        return pb_grpc.ReplicaServiceStub(channel)

    async def act(self, replica_address: str, node_id: str, action: NodeAction) -> ActionOutcome:
        try:
            response = await self._stub(replica_address).AdministerNode(
                action_to_pb(node_id, action),
                metadata=self._metadata,
                timeout=ACTION_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            if unreachable(error) or error.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            ):
                raise ReplicaUnavailable(f"{replica_address}: {error.details()}") from None
            raise domain_error_from_rpc(error) from None
        return outcome_from_pb(response)

    async def run(
        self, replica_address: str, assignment: Assignment
    ) -> AsyncGenerator[NodeReport, None]:
        call = self._stub(replica_address).RunForwardedJob(
            assignment_to_pb(assignment), metadata=self._metadata
        )
        try:
            async for response in call:
                yield report_from_pb(response, assignment.job_id, assignment.epoch)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise ReplicaUnavailable(f"{replica_address}: {error.details()}") from None
            raise domain_error_from_rpc(error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
