"""GET /v1/jobs and GET /v1/jobs/{job_id}: cloud's JobService over HTTP, with the
caller's key (a management key reads its account's jobs, an admin key every
account's). Errors are the OpenAI envelope, as on every other route."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, cast

from fastapi import APIRouter, Query, Request
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import job_service_pb2 as pb
from starlette.responses import Response

from core.metadata import Metadata
from core.replica_channels import ReplicatedStub
from gateway.cloud import unary
from gateway.errors import RequestParams
from gateway.job_schemas import (
    InferenceLog,
    Job,
    JobList,
    JobNode,
    JobPrice,
    JobStatus,
    JobUsage,
)
from gateway.relay import ClientGone, client_gone_response, unless_client_gone

if TYPE_CHECKING:
    from resultity.cloud.v1.job_service_pb2_grpc import JobServiceAsyncStub

_TIMEOUT_S = 30.0
# Latest second a protobuf Timestamp holds (9999-12-31T23:59:59Z).
MAX_UNIX_SECONDS = 253_402_300_799
MAX_PAGE_SIZE = 100
_STATUS_TO_PB: dict[str, pb.JobOutcome.ValueType] = {
    "running": pb.JOB_OUTCOME_RUNNING,
    "finished": pb.JOB_OUTCOME_FINISHED,
    "failed": pb.JOB_OUTCOME_FAILED,
    "cancelled": pb.JOB_OUTCOME_CANCELLED,
}
_STATUS_FROM_PB = {value: name for name, value in _STATUS_TO_PB.items()}
# What cloud's errors name, as these routes' query parameters call it.
LIST_PARAMS = RequestParams(
    frozenset(
        {
            "account_id",
            "model",
            "outcome",
            "request_id",
            "created_after",
            "created_before",
            "limit",
            "page_token",
        }
    ),
    {"outcomes": "outcome", "page_size": "limit"},
)
GET_PARAMS = RequestParams(frozenset({"job_id"}))

Id = Annotated[str, Query(max_length=256)]
UnixSeconds = Annotated[int | None, Query(ge=0, le=MAX_UNIX_SECONDS)]


def jobs_router(call_metadata: Callable[[Request], Metadata]) -> APIRouter:
    """The jobs routes; ``call_metadata`` gives a request's key and id as cloud expects
    them (401 without a key)."""
    router = APIRouter()

    @router.get("/v1/jobs")
    async def list_jobs(
        request: Request,
        account_id: Id = "",
        model: Id = "",
        outcome: Annotated[list[JobStatus], Query()] = [],  # noqa: B006 - FastAPI copies it
        request_id: Id = "",
        created_after: UnixSeconds = None,
        created_before: UnixSeconds = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
        page_token: Annotated[str, Query(max_length=1024)] = "",
    ) -> Response:
        metadata = call_metadata(request)
        request.state.params = LIST_PARAMS
        wanted = pb.ListJobsRequest(
            account_id=account_id,
            model=model,
            outcomes=[_STATUS_TO_PB[status] for status in outcome],
            request_id=request_id,
            created_after=_timestamp(created_after),
            created_before=_timestamp(created_before),
            page_size=limit,
            page_token=page_token,
        )
        call, answer = unary(
            _stub(request),
            lambda jobs: jobs.ListJobs(wanted, metadata=metadata, timeout=_TIMEOUT_S),
            again=True,
        )
        try:
            listed = await unless_client_gone(request, call, answer)
        except ClientGone:
            return client_gone_response()
        page = JobList(
            data=[job_from_proto(job) for job in listed.jobs],
            has_more=bool(listed.next_page_token),
            next_page_token=listed.next_page_token or None,
        )
        return Response(page.model_dump_json(), media_type="application/json")

    @router.get("/v1/jobs/{job_id}")
    async def get_job(request: Request, job_id: str, with_log: bool = False) -> Response:
        metadata = call_metadata(request)
        request.state.params = GET_PARAMS
        wanted = pb.GetJobRequest(job_id=job_id, with_log=with_log)
        call, answer = unary(
            _stub(request),
            lambda jobs: jobs.GetJob(wanted, metadata=metadata, timeout=_TIMEOUT_S),
            again=True,
        )
        try:
            got = await unless_client_gone(request, call, answer)
        except ClientGone:
            return client_gone_response()
        job = job_from_proto(got.job)
        if got.HasField("log"):
            job.log = _log(got.log)
        return Response(job.model_dump_json(), media_type="application/json")

    return router


def _stub(request: Request) -> ReplicatedStub[JobServiceAsyncStub]:
    return cast("ReplicatedStub[JobServiceAsyncStub]", request.app.state.jobs)


def _timestamp(seconds: int | None) -> Timestamp | None:
    return None if seconds is None else Timestamp(seconds=seconds)


def _set(stamp: Timestamp) -> bool:
    return bool(stamp.seconds or stamp.nanos)


def _after_ms(start: Timestamp, stamp: Timestamp) -> float | None:
    if not _set(stamp):
        return None
    return round((stamp.ToNanoseconds() - start.ToNanoseconds()) / 1e6, 1)


def job_from_proto(job: pb.Job) -> Job:
    return Job(
        id=job.job_id,
        request_id=job.request_id,
        account_id=job.account_id,
        subcloud_id=job.subcloud_id or None,
        model=job.model,
        nodes=[
            JobNode(
                node_id=node.node_id,
                epoch=node.epoch,
                operator_account_id=node.operator_account_id or None,
                assigned_at=node.assigned.seconds,
            )
            for node in job.nodes
        ],
        usage=JobUsage(
            prompt_tokens=job.usage.prompt_tokens,
            completion_tokens=job.usage.completion_tokens,
            total_tokens=job.usage.prompt_tokens + job.usage.completion_tokens,
        ),
        price=JobPrice(
            prompt_micro_credits_per_token=job.price.prompt_micro_credits_per_token,
            completion_micro_credits_per_token=job.price.completion_micro_credits_per_token,
        ),
        cost_micro_credits=job.cost_micro_credits,
        status=cast(JobStatus, _STATUS_FROM_PB.get(job.outcome, "running")),
        detail=job.detail or None,
        created_at=job.created.seconds,
        finished_at=job.finished.seconds if _set(job.finished) else None,
        time_to_first_token_ms=_after_ms(job.created, job.first_token),
        duration_ms=_after_ms(job.created, job.finished),
    )


def _log(log: pb.InferenceLog) -> InferenceLog:
    return InferenceLog(
        request=json_format.MessageToDict(log.request),
        response=json_format.MessageToDict(log.response),
        job_ids=list(log.job_ids),
        created_at=log.created.seconds,
        expires_at=log.expires.seconds,
    )
