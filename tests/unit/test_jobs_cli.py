"""`resultity jobs` output: the table, a job's details with its log, and time options."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import job_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from server.cloud.jobs_cli import _moment, job_details, job_table

CREATED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _stamp(after_ms: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(CREATED + timedelta(milliseconds=after_ms))
    return stamp


def _job(**fields: object) -> pb.Job:
    job = pb.Job(
        job_id="0123456789abcdef",
        request_id="req-1",
        account_id="4d8b5cc7-2aa5-4cbb-b19e-dc000c5cd6e1",
        model="smollm2",
        nodes=[
            pb.JobNode(node_id="node-aaaaaaaaaaaa", epoch=1, assigned=_stamp(0)),
            pb.JobNode(node_id="node-bbbbbbbbbbbb", epoch=2, assigned=_stamp(40)),
        ],
        usage=common_pb.Usage(prompt_tokens=7, completion_tokens=10),
        cost_micro_credits=27,
        outcome=pb.JOB_OUTCOME_FINISHED,
        detail="stop",
        created=_stamp(0),
        first_token=_stamp(12),
        finished=_stamp(120),
    )
    job.MergeFrom(pb.Job(**fields))  # type: ignore[arg-type]
    return job


def test_the_table_shows_tokens_cost_timings_and_the_last_node() -> None:
    header, row, more = job_table([_job()], "next-token").splitlines()
    assert header.split() == [
        "JOB",
        "CREATED",
        "ACCOUNT",
        "MODEL",
        "NODE",
        "TOKENS",
        "COST",
        "TTFT",
        "TIME",
        "OUTCOME",
    ]
    assert "node-bbbbbbb (+1 before)" in row
    for cell in (
        "0123456789abcdef",
        "2026-03-01 12:00:00",
        "4d8b5cc7",
        "7+10",
        "0.000027",
        "12ms",
        "120ms",
        "finished",
    ):
        assert cell in row
    assert more == "more: --page-token next-token"


def test_a_running_job_has_no_end_yet() -> None:
    running = pb.Job(job_id="j", outcome=pb.JOB_OUTCOME_RUNNING, created=_stamp(0))
    _, row = job_table([running]).splitlines()
    assert row.split()[-3:] == ["-", "-", "running"]


def test_details_show_each_node_and_the_log_when_asked() -> None:
    request, response = Struct(), Struct()
    request.update({"endpoint": "chat.completions", "messages": [{"role": "user"}]})
    response.update({"status": "completed"})
    logged = pb.GetJobResponse(
        job=_job(), log=pb.InferenceLog(request=request, response=response, expires=_stamp(0))
    )
    details = job_details(logged, with_log=True)
    assert "outcome:      finished (stop)" in details
    assert "  epoch 2: node-bbbbbbbbbbbb" in details
    assert '"endpoint": "chat.completions"' in details
    assert '"status": "completed"' in details
    unlogged = job_details(pb.GetJobResponse(job=_job()), with_log=True)
    assert "log:          none kept" in unlogged
    assert "log:" not in job_details(pb.GetJobResponse(job=_job()), with_log=False)


def test_times_are_iso_or_spans_back_from_now() -> None:
    assert _moment("2026-03-01T12:00:00") == CREATED
    assert _moment("2026-03-01T13:00:00+01:00") == CREATED
    before = datetime.now(UTC)
    moment = _moment("2h")
    assert before - timedelta(hours=2) <= moment <= datetime.now(UTC) - timedelta(hours=2)
    with pytest.raises(argparse.ArgumentTypeError):
        _moment("yesterday")
