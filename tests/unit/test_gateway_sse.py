"""SSE framing of streamed chunks and in-band errors."""

from __future__ import annotations

import json

from gateway import sse
from gateway.errors import ApiError
from gateway.schemas import Usage


def _chunk(usage: Usage | None = None) -> dict[str, object]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": "a\nb"}, "logprobs": None, "finish_reason": None}
        ],
        "usage": usage,
    }


def _payload(frame: bytes) -> dict[str, object]:
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # one line: JSON escapes newlines in content
    return json.loads(frame[len(b"data: ") : -2])  # type: ignore[no-any-return]


def test_chunk_without_usage_has_no_usage_key() -> None:
    payload = _payload(sse.encode_chunk(_chunk(), include_usage=False))

    assert "usage" not in payload
    assert payload["choices"] == [
        {"index": 0, "delta": {"content": "a\nb"}, "logprobs": None, "finish_reason": None}
    ]


def test_chunk_with_usage_has_null_usage_until_the_last() -> None:
    assert _payload(sse.encode_chunk(_chunk(), include_usage=True))["usage"] is None
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    assert _payload(sse.encode_chunk(_chunk(usage), include_usage=True))["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
    }


def test_error_event() -> None:
    frame = sse.encode_error(ApiError(502, "node lost", "server_error"))

    assert _payload(frame) == {
        "error": {"message": "node lost", "type": "server_error", "param": None, "code": None}
    }


def test_multiline_data_is_split_into_data_lines() -> None:
    assert sse.event("a\nb") == b"data: a\ndata: b\n\n"


def test_done() -> None:
    assert sse.DONE == b"data: [DONE]\n\n"
