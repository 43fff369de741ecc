"""Forwarding over gRPC: runs an assignment through the replica owning its node
(ReplicaService.RunForwardedJob), with the platform's service token."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from resultity.network.v1 import replica_service_pb2_grpc as pb_grpc

from core import channels
from core.grpc_errors import domain_error_from_rpc
from core.metadata import bearer_metadata
from server.network.forwarding import Assignment, ReplicaUnavailable
from server.network.jobs import NodeReport
from server.network.replica_convert import assignment_to_pb, report_from_pb


class GrpcForwarder:
    """Implements forwarding.Forwarder; keeps one channel per replica address."""

    def __init__(self, service_token: str, tls: channels.Tls = channels.PLAINTEXT) -> None:
        """``tls``: how to reach the other replicas (as this one's own clients do)."""
        self._metadata = bearer_metadata(service_token)
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(
        self, replica_address: str, assignment: Assignment
    ) -> AsyncGenerator[NodeReport, None]:
        channel = self._channels.get(replica_address)
        if channel is None:
            channel = self._channels[replica_address] = channels.channel(replica_address, self._tls)
        call = pb_grpc.ReplicaServiceStub(channel).RunForwardedJob(
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
