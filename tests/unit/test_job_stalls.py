"""The network's stall and queue timers of one assignment (ActiveJob): a job its
node's scheduler holds back, reported waiting, is not a stalled one; a node that
stops reporting is. The agent reports waiting within any stall timeout."""

from __future__ import annotations

import pytest

from agent.assignments import waiting_report_s
from agent.runtime.base import WAITING_REPORT_S
from core.agent_messages import ChunkReport, StartedReport, WaitingReport
from core.inference import ChatMessage, ChatRole, GenerationSpec, Sampling
from server.network.jobs import ActiveJob

SPEC = GenerationSpec("m", (ChatMessage(ChatRole.USER, "hi"),), Sampling(max_tokens=8), 64)
STALL_S = 60.0
QUEUE_S = 30.0


def assigned_at(now: float) -> ActiveJob:
    job = ActiveJob("j", SPEC, "n1")
    job.last_progress = job.assigned_at = now
    return job


def test_a_queued_job_is_bounded_by_the_queue_timeout_not_the_stall_timeout() -> None:
    job = assigned_at(0.0)
    assert not job.stalled(1000.0, STALL_S)
    assert not job.queued_too_long(QUEUE_S, QUEUE_S)
    assert job.queued_too_long(QUEUE_S + 1, QUEUE_S)


def test_a_running_job_silent_for_the_stall_timeout_is_stalled() -> None:
    job = assigned_at(0.0)
    job.heard(StartedReport("j", 1), 10.0)
    job.heard(ChunkReport("j", 1, "a", 1, 3), 20.0)
    assert not job.stalled(20.0 + STALL_S, STALL_S)
    assert job.stalled(20.0 + STALL_S + 1, STALL_S)
    assert not job.queued_too_long(1000.0, QUEUE_S)


def test_a_job_reported_waiting_on_its_nodes_scheduler_is_not_stalled() -> None:
    job = assigned_at(0.0)
    job.heard(StartedReport("j", 1), 0.0)
    job.heard(ChunkReport("j", 1, "a", 1, 3), 1.0)
    # Preempted: no tokens for minutes, but the scheduler says so every few seconds.
    for second in range(5, 300, 5):
        job.heard(WaitingReport("j", 1), float(second))
        assert not job.stalled(second + 4.0, STALL_S)
    job.heard(ChunkReport("j", 1, "b", 1, 0), 300.0)
    assert not job.stalled(300.0 + STALL_S, STALL_S)


def test_a_waiting_job_whose_node_then_hangs_is_stalled() -> None:
    job = assigned_at(0.0)
    job.heard(StartedReport("j", 1), 0.0)
    job.heard(WaitingReport("j", 1), 5.0)
    # The scheduler hung: no further report of any kind.
    assert job.stalled(5.0 + STALL_S + 1, STALL_S)


def test_a_waiting_report_implies_the_job_started() -> None:
    job = assigned_at(0.0)
    job.heard(WaitingReport("j", 1), 2.0)
    assert job.running
    assert not job.queued_too_long(1000.0, QUEUE_S)


def test_the_agent_reports_waiting_four_times_per_stall_timeout_and_at_least_every_5_s() -> None:
    assert waiting_report_s(STALL_S) == WAITING_REPORT_S == 5.0
    assert waiting_report_s(2.0) == 0.5
    assert waiting_report_s(0.3) == pytest.approx(0.075)
    # A network that does not tell its stall timeout (the welcome's field unset).
    assert waiting_report_s(0.0) == WAITING_REPORT_S
