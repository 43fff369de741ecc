"""Cross-cutting behaviour of the gateway app that needs no cloud."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from gateway.app import create_app
from gateway.relay import ClientWatch, CloudStreamResponse


async def _explode(_: Request) -> Response:
    raise RuntimeError("bug")


async def test_unhandled_error_becomes_a_500_envelope_with_request_id() -> None:
    app = create_app("127.0.0.1:1")
    app.add_route("/boom", _explode)
    transport = httpx.ASGITransport(app=app)

    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/boom")

    assert response.status_code == 500
    assert len(response.headers["x-request-id"]) == 32
    assert response.json() == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


async def test_missing_key_needs_no_cloud() -> None:
    # The lifespan (and so the cloud channel) never runs under ASGITransport.
    transport = httpx.ASGITransport(app=create_app("127.0.0.1:1"))

    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/v1/chat/completions", json={})

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


class _FinishedCall:
    """A cloud call that has already ended: nothing to cancel."""

    def cancel(self) -> bool:
        return False


async def test_stream_ends_its_body_with_the_last_part() -> None:
    async def parts() -> AsyncIterator[tuple[bytes, bool]]:
        yield b"data: 1\n\n", True
        yield b"data: usage\n\ndata: [DONE]\n\n", False

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    call = cast(Any, _FinishedCall())
    response = CloudStreamResponse(call, parts(), {}, ClientWatch(receive, call))
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)

    assert sent[0]["type"] == "http.response.start"
    # The closing part ends the body itself: no empty part (a write of its own) after it.
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"data: usage\n\ndata: [DONE]\n\n", False),
    ]


class _RunningCall:
    """A cloud call still streaming: cancelling it succeeds once, and a read waiting on
    it then raises CancelledError, as gRPC's do."""

    def __init__(self) -> None:
        self.cancelled = False
        self._cancelled = asyncio.Event()

    def cancel(self) -> bool:
        was_running, self.cancelled = not self.cancelled, True
        self._cancelled.set()
        return was_running

    async def read(self) -> None:
        await self._cancelled.wait()
        raise asyncio.CancelledError


async def test_client_leaving_mid_stream_cancels_the_cloud_call() -> None:
    call = _RunningCall()

    async def parts() -> AsyncIterator[tuple[bytes, bool]]:
        yield b"data: 1\n\n", True
        await call.read()  # cloud has nothing more yet
        yield b"data: [DONE]\n\n", False

    sent: list[Message] = []
    first_event = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            first_event.set()

    async def receive() -> Message:
        await first_event.wait()  # the client leaves once it got the first event
        return {"type": "http.disconnect"}

    watch = ClientWatch(receive, cast(Any, call))
    response = CloudStreamResponse(cast(Any, call), parts(), {}, watch)
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)

    assert call.cancelled
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n"]
