"""Job records and their filter: the network's DispatchService to cloud and back."""

from __future__ import annotations

from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb

from core.convert.generation import usage_from_pb, usage_to_pb
from core.convert.job_events import origin_from_pb, origin_to_pb
from core.convert.timestamps import optional_timestamp_to_pb, timestamp_from_pb, timestamp_to_pb
from core.errors import InvalidArgument
from core.job_records import Assignment, JobOutcome, JobQuery, JobRecord

OUTCOME_TO_PB = {
    JobOutcome.RUNNING: dispatch_pb.JOB_OUTCOME_RUNNING,
    JobOutcome.FINISHED: dispatch_pb.JOB_OUTCOME_FINISHED,
    JobOutcome.FAILED: dispatch_pb.JOB_OUTCOME_FAILED,
    JobOutcome.CANCELLED: dispatch_pb.JOB_OUTCOME_CANCELLED,
}
_OUTCOME_FROM_PB = {value: key for key, value in OUTCOME_TO_PB.items()}


def outcome_from_pb(
    value: dispatch_pb.JobOutcome.ValueType, *, field: str = "outcomes"
) -> JobOutcome:
    if value not in _OUTCOME_FROM_PB:
        raise InvalidArgument(f"{field} holds an unknown outcome ({value})", field=field)
    return _OUTCOME_FROM_PB[value]


def record_to_pb(record: JobRecord) -> dispatch_pb.JobRecord:
    return dispatch_pb.JobRecord(
        job_id=record.job_id,
        origin=origin_to_pb(record.origin),
        model=record.model,
        assignments=[
            dispatch_pb.JobAssignment(
                node_id=a.node_id,
                epoch=a.epoch,
                operator_account_id=a.operator_account_id,
                assigned=timestamp_to_pb(a.assigned_at),
            )
            for a in record.assignments
        ],
        usage=usage_to_pb(record.usage),
        outcome=OUTCOME_TO_PB[record.outcome],
        created=timestamp_to_pb(record.created_at),
        first_token=optional_timestamp_to_pb(record.first_token_at),
        finished=optional_timestamp_to_pb(record.finished_at),
        detail=record.detail,
    )


def record_from_pb(record: dispatch_pb.JobRecord) -> JobRecord:
    return JobRecord(
        job_id=record.job_id,
        origin=origin_from_pb(record.origin),
        model=record.model,
        assignments=tuple(
            Assignment(a.node_id, a.epoch, a.operator_account_id, timestamp_from_pb(a.assigned))
            for a in record.assignments
        ),
        usage=usage_from_pb(record.usage),
        created_at=timestamp_from_pb(record.created),
        first_token_at=(
            timestamp_from_pb(record.first_token) if record.HasField("first_token") else None
        ),
        finished_at=timestamp_from_pb(record.finished) if record.HasField("finished") else None,
        outcome=outcome_from_pb(record.outcome, field="outcome"),
        detail=record.detail,
    )


def query_to_pb(query: JobQuery) -> dispatch_pb.JobRecordFilter:
    return dispatch_pb.JobRecordFilter(
        account_id=query.account_id,
        model=query.model,
        outcomes=sorted(OUTCOME_TO_PB[outcome] for outcome in query.outcomes),
        request_id=query.request_id,
        created_after=optional_timestamp_to_pb(query.created_after),
        created_before=optional_timestamp_to_pb(query.created_before),
    )


def query_from_pb(query: dispatch_pb.JobRecordFilter) -> JobQuery:
    return JobQuery(
        account_id=query.account_id,
        model=query.model,
        outcomes=frozenset(outcome_from_pb(value) for value in query.outcomes),
        request_id=query.request_id,
        created_after=(
            timestamp_from_pb(query.created_after, field="created_after")
            if query.HasField("created_after")
            else None
        ),
        created_before=(
            timestamp_from_pb(query.created_before, field="created_before")
            if query.HasField("created_before")
            else None
        ),
    )
