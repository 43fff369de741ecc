"""Relaying a cloud call to the HTTP client: waiting on it unless the client leaves,
and streaming its messages as server-sent events.

A client that disconnects cancels its cloud call, so cloud stops the job instead
of generating for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import Message as ProtoMessage
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import errors, sse

log = structlog.get_logger("gateway")

_T = TypeVar("_T")
_Message = TypeVar("_Message", bound=ProtoMessage)

# Status logged (never delivered) when the client went away before the answer.
_CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The HTTP client disconnected while the gateway waited on cloud."""


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body is consumed, so the next ASGI message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, call: grpc.aio.Call, step: Awaitable[_T]) -> _T:
    """Awaits one step of a cloud call; cancels the call (and raises ClientGone) if the
    HTTP client leaves first."""
    step_task = asyncio.ensure_future(step)
    gone = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait((step_task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not step_task.done():
            step_task.cancel()
            call.cancel()
    if not step_task.done():
        raise ClientGone
    return step_task.result()


def client_gone_response() -> Response:
    log.info("gateway.client_disconnected")
    return Response(status_code=_CLIENT_CLOSED_REQUEST)


async def rate_limit_headers(call: grpc.aio.Call) -> dict[str, str]:
    """The caller's x-ratelimit-* state, as cloud sent it in initial metadata."""
    return errors.rate_limit_headers(await call.initial_metadata() or ())


@dataclass(frozen=True)
class StreamEnding:
    """What closes a stream: after its last message (``done``), and in place of the
    rest when cloud's call fails once the response started (``failure``)."""

    done: bytes
    failure: Callable[[errors.ApiError], bytes]


# Chat and text completions end with `[DONE]`, also after an error event.
COMPLETION_ENDING = StreamEnding(sse.DONE, lambda error: sse.encode_error(error) + sse.DONE)


async def stream_sse(
    request: Request,
    call: grpc.aio.UnaryStreamCall[Any, _Message],
    render: Callable[[_Message], bytes | None],
    ending: StreamEnding = COMPLETION_ENDING,
) -> Response:
    """An SSE response relaying cloud's stream; each message becomes the event
    ``render`` makes of it (None: not sent).

    Cloud's closing message (the only one with usage) goes out in one write with
    ``ending.done`` and the end of the body, before the call's status arrives."""
    messages = aiter(call)
    # Read the first message before answering so that errors cloud raises up front
    # (bad key, unknown model, no funds) get a proper HTTP status.
    try:
        first: _Message | None = await unless_client_gone(request, call, anext(messages))
    except StopAsyncIteration:
        first = None
    except ClientGone:
        return client_gone_response()

    async def events() -> AsyncIterator[tuple[bytes, bool]]:
        """(bytes, more to come); the last item ends the body."""
        try:
            message = first
            while message is not None:
                event = render(message)
                if message.HasField("usage"):
                    yield (event or b"") + ending.done, False
                    await _ended(call, messages)
                    return
                if event is not None:
                    yield event, True
                message = await anext(messages, None)
        except grpc.aio.AioRpcError as error:
            api_error = errors.from_rpc_error(error, getattr(request.state, "params", None))
            log.info("gateway.cloud_error_in_stream", code=error.code().name)
            yield ending.failure(api_error), False
            return
        yield ending.done, False

    return CloudStreamResponse(call, events(), await rate_limit_headers(call))


async def _ended(call: grpc.aio.Call, messages: AsyncIterator[Any]) -> None:
    """Waits for the status of a call that sent its closing message (the body is complete)."""
    try:
        extra = await anext(messages, None)
    except grpc.aio.AioRpcError as error:
        log.warning("gateway.cloud_error_after_stream", code=error.code().name)
        return
    if extra is not None:
        log.warning("gateway.cloud_message_after_stream")
        call.cancel()


class CloudStreamResponse(StreamingResponse):
    """An SSE response that cancels its cloud call however the response ends: when the
    client disconnects, and on every other exit too.

    The body yields (bytes, more to come): the last part ends the body in the same
    write, where StreamingResponse would send an empty part of its own."""

    def __init__(
        self,
        call: grpc.aio.Call,
        parts: AsyncIterator[tuple[bytes, bool]],
        headers: dict[str, str],
    ) -> None:
        # The body is ``parts``, which stream_response below sends; StreamingResponse's
        # own content stays empty.
        super().__init__((), media_type=sse.MEDIA_TYPE, headers={**sse.HEADERS, **headers})
        self._call = call
        self._parts = parts

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for part, more in self._parts:
            await send({"type": "http.response.body", "body": part, "more_body": more})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One task watches for the disconnect (Starlette would run an anyio task group
        # with cancel scopes for it, at several times the cost).
        streaming = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((streaming, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not streaming.done():
                streaming.cancel()
                await asyncio.wait((streaming,))
            if self._call.cancel():
                log.info("gateway.stream_cancelled")
        if not streaming.cancelled():
            streaming.result()  # the body's own failure, if any
