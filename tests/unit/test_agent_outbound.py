"""The agent's outbound stream: reports queued together leave as one batch, in order;
a lone report leaves alone, at once; the session's end stops the stream."""

from __future__ import annotations

import asyncio

from resultity.agent.v1 import agent_service_pb2 as pb

from agent.session import _drain
from core.agent_messages import ChunkReport, StartedReport
from core.convert.agent_reports import report_to_pb, reports_from_pb


def _chunk(text: str) -> pb.ConnectRequest:
    return report_to_pb(ChunkReport("j", 1, text, 1, 0))


async def test_reports_queued_together_leave_as_one_batch_in_order() -> None:
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
    for message in (report_to_pb(StartedReport("j", 1)), _chunk("a"), _chunk("b")):
        outbound.put_nowait(message)
    stream = _drain(outbound)
    batch = await anext(stream)
    assert batch.WhichOneof("message") == "batch"
    assert [type(report).__name__ for report in reports_from_pb(batch)] == [
        "StartedReport",
        "ChunkReport",
        "ChunkReport",
    ]
    assert [r.text for r in reports_from_pb(batch) if isinstance(r, ChunkReport)] == ["a", "b"]


async def test_a_lone_report_leaves_alone_without_waiting_for_more() -> None:
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
    outbound.put_nowait(_chunk("a"))
    stream = _drain(outbound)
    assert await anext(stream) == _chunk("a")
    outbound.put_nowait(_chunk("b"))
    assert await anext(stream) == _chunk("b")


async def test_the_end_of_the_session_ends_the_stream_after_what_was_queued() -> None:
    outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
    for message in (_chunk("a"), _chunk("b"), None, _chunk("late")):
        outbound.put_nowait(message)
    sent = [message async for message in _drain(outbound)]
    assert len(sent) == 1
    assert [r.text for r in reports_from_pb(sent[0]) if isinstance(r, ChunkReport)] == ["a", "b"]
    outbound = asyncio.Queue()
    outbound.put_nowait(_chunk("a"))
    outbound.put_nowait(None)
    assert [message async for message in _drain(outbound)] == [_chunk("a")]
