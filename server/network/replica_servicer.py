"""gRPC transport of ReplicaService: jobs other network replicas forward to this
one's nodes, and operators' actions on them. Only the platform's service token
may call it (callers.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from resultity.network.v1 import replica_service_pb2 as pb
from resultity.network.v1 import replica_service_pb2_grpc as pb_grpc

from core.grpc_errors import translate_errors
from server.network.callers import ServiceCallers, service_only
from server.network.node_actions import ActionOutcome
from server.network.replica_convert import (
    action_from_pb,
    assignment_from_pb,
    outcome_to_pb,
    report_to_pb,
)
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

    @translate_errors
    @service_only
    async def AdministerNode(
        self,
        request: pb.AdministerNodeRequest,
        context: grpc.aio.ServicerContext[pb.AdministerNodeRequest, pb.AdministerNodeResponse],
    ) -> pb.AdministerNodeResponse:
        node = await self._service.act_here(request.node_id, action_from_pb(request))
        return outcome_to_pb(
            ActionOutcome.of(node, time.monotonic(), self._service.liveness.suspect_s)
        )
