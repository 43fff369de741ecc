"""ReplicaService messages carry every field of an assignment and of each report."""

from __future__ import annotations

import pytest

from core.agent_messages import (
    ChunkReport,
    DoneReport,
    FailedReport,
    FailureKind,
    StartedReport,
    WaitingReport,
)
from core.inference import (
    ChatMessage,
    ChatRole,
    Continuation,
    FinishReason,
    GenerationSpec,
    Sampling,
    TokenLogprob,
    Usage,
)
from server.network.forwarding import Assignment
from server.network.jobs import NodeLost, NodeReport, QueueTimeout
from server.network.replica_convert import (
    assignment_from_pb,
    assignment_to_pb,
    report_from_pb,
    report_to_pb,
)

SPEC = GenerationSpec(
    "m", (ChatMessage(ChatRole.USER, "hi"),), Sampling(max_tokens=8, temperature=0.0), 64
)


@pytest.mark.parametrize(
    "continuation", [None, Continuation("one two", 2, (11, 12)), Continuation("x", 1)]
)
def test_an_assignment_round_trips(continuation: Continuation | None) -> None:
    assignment = Assignment("job", 3, "node", SPEC, continuation)
    assert assignment_from_pb(assignment_to_pb(assignment)) == assignment


@pytest.mark.parametrize(
    "report",
    [
        StartedReport("job", 3),
        WaitingReport("job", 3),
        ChunkReport("job", 3, "hi", 1, 4, (7,), (TokenLogprob("hi", b"hi", -0.5, ()),)),
        ChunkReport("job", 3, "", 0, 3, embedding=(0.25, -1.0)),
        DoneReport("job", 3, FinishReason.LENGTH, Usage(4, 8)),
        FailedReport(
            "job", 3, FailureKind.INVALID_REQUEST, "too long", Usage(4, 0), param="messages"
        ),
        FailedReport("job", 3, FailureKind.RUNTIME_ERROR, "crashed"),
        QueueTimeout(30.5, 3),
        NodeLost("heartbeat timeout", 3),
    ],
)
def test_a_report_round_trips(report: NodeReport) -> None:
    # Signatures stay with the owner, which checked them.
    assert report_from_pb(report_to_pb(report), "job", 3) == report
