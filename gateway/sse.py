"""Server-sent events framing of streamed completions and responses, as OpenAI sends them."""

from __future__ import annotations

from pydantic_core import to_json

from gateway.errors import ApiError
from gateway.responses_schemas import StreamEventData

MEDIA_TYPE = "text/event-stream"
# Proxies must pass each event on as it comes rather than buffer the body.
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"


def event(data: str) -> bytes:
    """One `data:` event; multi-line payloads become one `data:` line per line."""
    lines = data.split("\n")
    return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"


def _data(payload: object) -> bytes:
    """A `data:` event of ``payload`` as JSON (its pydantic parts dump themselves)."""
    # Compact JSON holds no raw newline (strings escape it): the event is one line.
    return b"data: " + to_json(payload) + b"\n\n"


def encode_chunk(chunk: dict[str, object], *, include_usage: bool) -> bytes:
    """A chat or text completion's chunk as convert renders it (chunk_from_proto,
    text_chunk_from_proto)."""
    # With include_usage every chunk carries "usage" (null until the last); without it
    # the key is absent, as in OpenAI's stream.
    if not include_usage:
        del chunk["usage"]
    return _data(chunk)


def encode_error(error: ApiError) -> bytes:
    """An error that happened after the stream started, when no status can be sent."""
    return event(error.envelope().model_dump_json())


def encode_response_event(event: StreamEventData) -> bytes:
    """One Responses API event as responses_convert renders it: its type as the SSE
    event name, then its JSON."""
    return b"event: " + str(event["type"]).encode() + b"\n" + _data(event)
