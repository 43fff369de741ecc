"""The coordinator's relay of an assignment running on another replica's node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from core.agent_messages import ChunkReport, DoneReport, StartedReport, WaitingReport
from core.errors import NotFound
from core.inference import ChatMessage, ChatRole, FinishReason, GenerationSpec, Sampling, Usage
from server.network.forwarding import Assignment, ForwardedJobs, ReplicaUnavailable
from server.network.jobs import ActiveJob, NodeLost, NodeReport, QueueTimeout
from server.network.nodes import NodeState
from server.network.presence import NodePresence
from server.network.remote_nodes import RemoteNode
from tests.harness import eventually

SPEC = GenerationSpec("m", (ChatMessage(ChatRole.USER, "hi"),), Sampling(max_tokens=8), 64)


class ScriptedForwarder:
    """Answers every forwarded assignment with ``reports``, then ``error`` if set."""

    def __init__(self, reports: list[NodeReport], error: Exception | None = None) -> None:
        self.reports = reports
        self.error = error
        self.assignments: list[tuple[str, Assignment]] = []
        self.finished = False

    async def run(
        self, replica_address: str, assignment: Assignment
    ) -> AsyncGenerator[NodeReport, None]:
        self.assignments.append((replica_address, assignment))
        try:
            for report in self.reports:
                yield report
            if self.error is not None:
                raise self.error
        finally:
            self.finished = True


def remote_node() -> RemoteNode:
    now = time.time()
    return RemoteNode.from_record(
        NodePresence(
            "n1",
            "r2",
            "r2:50051",
            NodeState.READY,
            ("m",),
            "",
            "",
            1.0,
            False,
            0,
            1,
            0.0,
            now,
            now,
            now + 30,
        ),
        time.monotonic(),
        now,
    )


async def drained(job: ActiveJob, forwarder: ScriptedForwarder) -> list[tuple[int, NodeReport]]:
    """What the relay posted to the job, once the forwarded stream ended."""
    await eventually(lambda: forwarder.finished)
    await asyncio.sleep(0)  # the relay's last step after the stream
    reports = []
    while not job.reports.empty():
        reports.append(job.reports.get_nowait())
    return reports


async def test_reports_reach_the_job_under_the_assignments_epoch() -> None:
    chunk = ChunkReport("j", 1, "hi", 1, 3)
    done = DoneReport("j", 1, FinishReason.STOP, Usage(3, 1))
    forwarder = ScriptedForwarder([chunk, done])
    job, node = ActiveJob("j", SPEC, "n1"), remote_node()
    ForwardedJobs(forwarder).start(job, node, Assignment("j", 1, "n1", SPEC))
    assert await drained(job, forwarder) == [(1, chunk), (1, done)]
    assert forwarder.assignments[0][0] == "r2:50051"
    assert node.active_jobs == 1  # reserved until the owner's next snapshot


async def test_an_unreachable_replica_gives_the_assignment_up_and_is_reported() -> None:
    forwarder = ScriptedForwarder([ChunkReport("j", 1, "a", 1, 3)], ReplicaUnavailable("gone"))
    unreachable: list[str] = []
    job = ActiveJob("j", SPEC, "n1")
    ForwardedJobs(forwarder, unreachable=unreachable.append).start(
        job, remote_node(), Assignment("j", 1, "n1", SPEC)
    )
    reports = await drained(job, forwarder)
    assert [type(report) for _, report in reports] == [ChunkReport, NodeLost]
    assert unreachable == ["r2"]
    assert job.fenced_epoch == 1


async def test_a_refusal_by_the_owner_gives_the_assignment_up() -> None:
    forwarder = ScriptedForwarder([], NotFound("node n1 is not connected"))
    job = ActiveJob("j", SPEC, "n1")
    ForwardedJobs(forwarder).start(job, remote_node(), Assignment("j", 1, "n1", SPEC))
    [(epoch, lost)] = await drained(job, forwarder)
    assert epoch == 1
    assert isinstance(lost, NodeLost)
    assert "not connected" in lost.reason


async def test_reports_of_a_superseded_epoch_are_dropped() -> None:
    forwarder = ScriptedForwarder([ChunkReport("j", 1, "late", 1, 3)])
    job = ActiveJob("j", SPEC, "n1")
    job.reassign("n2")  # the coordinator moved on before the owner answered
    ForwardedJobs(forwarder).start(job, remote_node(), Assignment("j", 1, "n1", SPEC))
    assert await drained(job, forwarder) == []


async def test_a_started_job_runs_and_its_stall_timer_applies() -> None:
    forwarder = ScriptedForwarder([StartedReport("j", 1)])
    job = ActiveJob("j", SPEC, "n1")
    ForwardedJobs(forwarder).start(job, remote_node(), Assignment("j", 1, "n1", SPEC))
    reports = await drained(job, forwarder)
    assert reports[0] == (1, StartedReport("j", 1))
    assert job.running
    # The stream ended without a result: the assignment is given up.
    assert isinstance(reports[1][1], NodeLost)


async def test_a_waiting_job_reported_by_the_owner_runs_and_is_relayed_as_progress() -> None:
    forwarder = ScriptedForwarder([StartedReport("j", 1), WaitingReport("j", 1)])
    job = ActiveJob("j", SPEC, "n1")
    ForwardedJobs(forwarder).start(job, remote_node(), Assignment("j", 1, "n1", SPEC))
    reports = await drained(job, forwarder)
    assert reports[1] == (1, WaitingReport("j", 1))
    assert job.running


async def test_a_queue_timeout_on_the_owner_expires_the_job() -> None:
    forwarder = ScriptedForwarder([QueueTimeout(31.0, 1)])
    job = ActiveJob("j", SPEC, "n1")
    ForwardedJobs(forwarder).start(job, remote_node(), Assignment("j", 1, "n1", SPEC))
    [(epoch, expired)] = await drained(job, forwarder)
    assert (epoch, type(expired)) == (1, QueueTimeout)
    assert job.fenced_epoch == 1
