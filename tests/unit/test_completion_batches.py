"""Events of a streamed completion that are ready together: cloud's InferenceService
marks where a run of them ends (Flush), its API sends each run as one message, and the
gateway splits such a message back into the messages of one event it renders."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

from core.inference import (
    NO_ORIGIN,
    CatalogModel,
    ChatMessage,
    ChatRole,
    FinishReason,
    GenerationSpec,
    JobEvent,
    JobOrigin,
    ModelPrice,
    NodeRequirements,
    TokenLogprob,
    Usage,
)
from gateway.convert import single_events
from server.cloud.convert import (
    chat_chunk_to_pb,
    chat_events_to_pb,
    stream_header,
    text_chunk_to_pb,
    text_events_to_pb,
)
from server.cloud.inference import InferenceService
from server.cloud.inflight import InFlightLeases
from server.cloud.ports import NO_REQUIREMENTS
from server.cloud.requests import (
    FLUSH,
    ChatRequest,
    ChoiceFinished,
    ChoiceStarted,
    CompletionEvent,
    CompletionFinished,
    CompletionStarted,
    ContentDelta,
    Flush,
    ToolCallDelta,
)
from server.cloud.settler import Settler
from server.common.settlement_queue import InProcessSettlementQueue
from tests.doubles.cloud_ports import FakeAccount, FakeNetwork, InMemoryInFlight, completion

MODEL = CatalogModel(
    "m", "resultity", ModelPrice(2, 5), 1024, chat_template_overhead_tokens=10, ready_nodes=1
)
KEY = "sk-customer"
STARTED = CompletionStarted("cmpl-1", "m", datetime(2026, 1, 1, tzinfo=UTC))
HEADER = stream_header(STARTED)
# A choice as its events come: assigned alone, its deltas with its finish.
CHOICE: list[CompletionEvent] = [
    ChoiceStarted(0),
    ContentDelta("Hel", 0, (TokenLogprob("Hel", b"Hel", -0.5),)),
    ContentDelta("lo", 0),
    ToolCallDelta(0, 0, "call_1", "f"),
    ToolCallDelta(0, 0, arguments="{}"),
    ChoiceFinished(0, FinishReason.TOOL_CALLS),
]
FINISHED = CompletionFinished(Usage(3, 2), 42)


class _BatchedNetwork(FakeNetwork):
    """Relays a job's assignment alone and the rest of its script as one batch, as the
    network does when a node reported it all at once."""

    async def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
        origin: JobOrigin = NO_ORIGIN,
    ) -> AsyncGenerator[list[JobEvent], None]:
        events = super().run_job(job_id, spec, requirements, origin)
        async with contextlib.aclosing(events):
            yield await anext(events)
            yield [event async for [event] in events]


def test_events_ready_together_are_one_chat_message_that_splits_into_those_of_each() -> None:
    events = [*CHOICE, FINISHED]

    message = chat_events_to_pb(events, HEADER)

    assert message is not None
    assert len(message.choices) == len(CHOICE)
    assert message.usage.completion_tokens == 2
    assert message.billing.charged_micro_credits == 42
    assert single_events(message) == [chat_chunk_to_pb(event, HEADER) for event in events]


def test_a_chat_message_of_one_event_is_as_before() -> None:
    for event in [*CHOICE, FINISHED]:
        message = chat_events_to_pb([event], HEADER)
        assert message == chat_chunk_to_pb(event, HEADER)
        assert message is not None
        assert single_events(message) == [message]
    assert chat_events_to_pb([STARTED], HEADER) is None


def test_text_events_ready_together_open_the_stream_with_their_deltas() -> None:
    deltas = [ContentDelta("Hel", 1), ContentDelta("lo", 1), ChoiceFinished(1, FinishReason.STOP)]

    opening = text_events_to_pb([STARTED, ChoiceStarted(0)], HEADER)
    opened_with_deltas = text_events_to_pb([STARTED, ChoiceStarted(1), *deltas], HEADER)
    closing = text_events_to_pb([*deltas, FINISHED], HEADER)

    assert opening == text_chunk_to_pb(STARTED, HEADER)
    assert opened_with_deltas is not None
    assert [delta.text for delta in opened_with_deltas.choices] == ["Hel", "lo", ""]
    assert closing is not None
    expected = [text_chunk_to_pb(event, HEADER) for event in [*deltas, FINISHED]]
    assert single_events(closing) == expected
    assert text_events_to_pb([ChoiceStarted(0)], HEADER) is None


async def test_the_stream_marks_the_events_that_were_ready_together() -> None:
    account = FakeAccount()
    account.add_customer(KEY, 1_000_000)
    network = _BatchedNetwork([MODEL])
    network.scripts.extend([completion(["a", "b", "c"], prompt_tokens=2)] * 4)
    service = InferenceService(
        account,
        network,
        settlements=Settler(account, InProcessSettlementQueue()),
        inflight=InFlightLeases(InMemoryInFlight(), lease_s=60),
    )
    request = ChatRequest(model="m", messages=(ChatMessage(ChatRole.USER, "hi"),), n=2)

    events = [e async for e in service.stream(f"Bearer {KEY}", request, "r", flushes=True)]

    kinds = [type(event) for event in events]
    assert kinds == [
        CompletionStarted,
        ChoiceStarted,
        Flush,
        ContentDelta,
        ContentDelta,
        ContentDelta,
        ChoiceFinished,
        Flush,
        ChoiceStarted,
        Flush,
        ContentDelta,
        ContentDelta,
        ContentDelta,
        ChoiceFinished,
        Flush,
        CompletionFinished,
        Flush,
    ]
    assert events[-1] is FLUSH
    plain = [e async for e in service.stream(f"Bearer {KEY}", request, "r2")]
    assert [type(event) for event in plain] == [k for k in kinds if k is not Flush]
