"""gRPC transport of the jobs API around JobService."""

from __future__ import annotations

from resultity.cloud.v1 import job_service_pb2 as pb
from resultity.cloud.v1 import job_service_pb2_grpc as pb_grpc

from core.grpc_errors import translate_errors
from server.cloud.jobs import JobService
from server.cloud.jobs_convert import job_to_pb, log_to_pb, query_from_pb
from server.common.transport import Context, authorization


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, jobs: JobService) -> None:
        self._jobs = jobs

    @translate_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        viewer = await self._jobs.viewer(authorization(context))
        jobs, next_token = await self._jobs.list(
            viewer, query_from_pb(request), request.page_size, request.page_token
        )
        return pb.ListJobsResponse(
            jobs=[job_to_pb(job) for job in jobs], next_page_token=next_token
        )

    @translate_errors
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        viewer = await self._jobs.viewer(authorization(context))
        job, log = await self._jobs.get(viewer, request.job_id, with_log=request.with_log)
        return pb.GetJobResponse(job=job_to_pb(job), log=None if log is None else log_to_pb(log))
