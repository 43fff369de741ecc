"""Which message each event of a streamed completion becomes on cloud's API."""

from __future__ import annotations

from datetime import UTC, datetime

from resultity.common.v1 import inference_pb2 as common_pb

from core.inference import FinishReason, TokenLogprob, Usage
from server.cloud.convert import chat_chunk_to_pb, stream_header, text_chunk_to_pb
from server.cloud.requests import (
    ChoiceFinished,
    ChoiceStarted,
    CompletionFinished,
    CompletionStarted,
    ContentDelta,
)

STARTED = CompletionStarted("cmpl-1", "m", datetime(2026, 1, 1, tzinfo=UTC))
HEADER = stream_header(STARTED)
LOGPROB = TokenLogprob(" a", b" a", -0.5)


def test_a_chat_stream_repeats_the_header_and_sends_nothing_for_its_start() -> None:
    assert chat_chunk_to_pb(STARTED, HEADER) is None
    opening = chat_chunk_to_pb(ChoiceStarted(0), HEADER)
    content = chat_chunk_to_pb(ContentDelta(" a", 0, (LOGPROB,)), HEADER)
    finish = chat_chunk_to_pb(ChoiceFinished(0, FinishReason.LENGTH), HEADER)
    closing = chat_chunk_to_pb(CompletionFinished(Usage(3, 1), 42), HEADER)

    assert opening is not None
    assert content is not None
    assert finish is not None
    assert closing is not None
    for message in (opening, content, finish, closing):
        assert (message.id, message.model, message.created.seconds) == (
            "cmpl-1",
            "m",
            int(STARTED.created.timestamp()),
        )
    assert opening.choices[0].role == common_pb.CHAT_ROLE_ASSISTANT
    assert (content.choices[0].content, content.choices[0].logprobs[0].bytes) == (" a", b" a")
    assert finish.choices[0].finish_reason == common_pb.FINISH_REASON_LENGTH
    assert not closing.choices
    assert (closing.usage.prompt_tokens, closing.billing.charged_micro_credits) == (3, 42)


def test_a_text_stream_opens_with_the_header_alone_and_skips_choice_starts() -> None:
    opening = text_chunk_to_pb(STARTED, HEADER)

    assert opening is not None
    assert (opening.id, list(opening.choices), opening.HasField("usage")) == ("cmpl-1", [], False)
    assert text_chunk_to_pb(ChoiceStarted(0), HEADER) is None
    content = text_chunk_to_pb(ContentDelta(" a", 1), HEADER)
    assert content is not None
    assert (content.choices[0].index, content.choices[0].text) == (1, " a")
