"""gRPC transport of ReplicaService: jobs other network replicas forward to this
one's nodes. Only the platform's service token may call it (callers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from resultity.network.v1 import replica_service_pb2 as pb
from resultity.network.v1 import replica_service_pb2_grpc as pb_grpc

from core.grpc_errors import translate_errors
from server.network.callers import ServiceCallers, service_only
from server.network.replica_convert import assignment_from_pb, report_to_pb
from server.network.service import NetworkService


class ReplicaServicer(pb_grpc.ReplicaServiceServicer):
    def __init__(self, service: NetworkService, callers: ServiceCallers) -> None:
        self._service = service
        self.callers = callers

    @translate_errors
    @service_only
    async def RunForwardedJob(
        self,
        request: pb.RunForwardedJobRequest,
        context: grpc.aio.ServicerContext[pb.RunForwardedJobRequest, pb.RunForwardedJobResponse],
    ) -> AsyncIterator[pb.RunForwardedJobResponse]:
        assignment = assignment_from_pb(request)
        reports = self._service.run_forwarded(
            assignment.job_id,
            assignment.epoch,
            assignment.node_id,
            assignment.spec,
            assignment.continuation,
        )
        try:
            async for report in reports:
                yield report_to_pb(report)
        finally:
            # Cancels the assignment on the node when the coordinator went away.
            await reports.aclose()
