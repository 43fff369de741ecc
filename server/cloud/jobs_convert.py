"""Conversions of the jobs API's messages: job views, queries and inference logs."""

from __future__ import annotations

from google.protobuf import struct_pb2
from resultity.cloud.v1 import job_service_pb2 as pb

from core.convert.catalog import price_to_pb
from core.convert.generation import usage_to_pb
from core.convert.timestamps import optional_timestamp_to_pb, timestamp_from_pb, timestamp_to_pb
from core.errors import InvalidArgument
from core.job_records import JobOutcome, JobQuery
from server.cloud.inference_logs import InferenceLog, Json
from server.cloud.jobs import JobView

OUTCOME_TO_PB = {
    JobOutcome.RUNNING: pb.JOB_OUTCOME_RUNNING,
    JobOutcome.FINISHED: pb.JOB_OUTCOME_FINISHED,
    JobOutcome.FAILED: pb.JOB_OUTCOME_FAILED,
    JobOutcome.CANCELLED: pb.JOB_OUTCOME_CANCELLED,
}
_OUTCOME_FROM_PB = {value: key for key, value in OUTCOME_TO_PB.items()}


def query_from_pb(request: pb.ListJobsRequest) -> JobQuery:
    outcomes = set()
    for value in request.outcomes:
        if value not in _OUTCOME_FROM_PB:
            raise InvalidArgument(f"outcomes holds an unknown outcome ({value})", field="outcomes")
        outcomes.add(_OUTCOME_FROM_PB[value])
    return JobQuery(
        account_id=request.account_id,
        model=request.model,
        outcomes=frozenset(outcomes),
        request_id=request.request_id,
        created_after=(
            timestamp_from_pb(request.created_after, field="created_after")
            if request.HasField("created_after")
            else None
        ),
        created_before=(
            timestamp_from_pb(request.created_before, field="created_before")
            if request.HasField("created_before")
            else None
        ),
    )


def job_to_pb(view: JobView) -> pb.Job:
    record = view.record
    return pb.Job(
        job_id=record.job_id,
        request_id=record.origin.request_id,
        account_id=record.origin.account_id,
        subcloud_id=record.origin.subcloud_id,
        model=record.model,
        nodes=[
            pb.JobNode(
                node_id=a.node_id,
                epoch=a.epoch,
                operator_account_id=a.operator_account_id,
                assigned=timestamp_to_pb(a.assigned_at),
            )
            for a in record.assignments
        ],
        usage=usage_to_pb(record.usage),
        price=price_to_pb(record.origin.price),
        cost_micro_credits=view.cost,
        outcome=OUTCOME_TO_PB[record.outcome],
        detail=record.detail,
        created=timestamp_to_pb(record.created_at),
        first_token=optional_timestamp_to_pb(record.first_token_at),
        finished=optional_timestamp_to_pb(record.finished_at),
    )


def _struct(value: Json) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def log_to_pb(log: InferenceLog) -> pb.InferenceLog:
    return pb.InferenceLog(
        request=_struct(log.request),
        response=_struct(log.response),
        job_ids=log.job_ids,
        created=timestamp_to_pb(log.created_at),
        expires=timestamp_to_pb(log.expires_at),
    )
