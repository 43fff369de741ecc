"""Relaying a cloud call to the HTTP client: waiting on it unless the client leaves,
and streaming its messages as server-sent events.

A client that disconnects cancels its cloud call, so cloud stops the job instead
of generating for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import structlog
from google.protobuf.message import Message as ProtoMessage
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import errors, sse
from gateway.cloud import CloudCall

log = structlog.get_logger("gateway")

_T = TypeVar("_T")
_Message = TypeVar("_Message", bound=ProtoMessage)

# Status logged (never delivered) when the client went away before the answer.
_CLIENT_CLOSED_REQUEST = 499


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


class ClientGone(Exception):
    """The HTTP client disconnected while the gateway waited on cloud."""


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body is consumed, so the next ASGI message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, call: Cancellable, step: Awaitable[_T]) -> _T:
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


async def rate_limit_headers(call: CloudCall) -> dict[str, str]:
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
    call: CloudCall,
    messages: AsyncIterator[_Message],
    render: Callable[[_Message], bytes | None],
    ending: StreamEnding = COMPLETION_ENDING,
    held: Callable[[_Message], bool] = lambda _: False,
) -> Response:
    """An SSE response relaying cloud's stream, the ``messages`` of ``call``; each
    becomes the event ``render`` makes of it (None: not sent).

    Cloud's closing message (the only one with usage) goes out in one write with
    ``ending.done`` and the end of the body, before the call's status arrives. The
    events of messages ``held`` picks (those that show the caller nothing: a role, a
    finish reason) wait to go out in one write with the next part: one socket write
    is much of what a part costs."""
    watch = ClientWatch(request.receive, call)
    # Read the first message before answering so that errors cloud raises up front
    # (bad key, unknown model, no funds) get a proper HTTP status.
    try:
        first: _Message | None = await anext(messages)
    except StopAsyncIteration:
        first = None
    except BaseException as error:
        watch.stop()
        if watch.gone and isinstance(error, asyncio.CancelledError):
            return client_gone_response()
        call.cancel()
        raise

    async def events() -> AsyncIterator[tuple[bytes, bool]]:
        """(bytes, more to come); the last item ends the body."""
        waiting = b""  # events held for the next part
        try:
            message = first
            while message is not None:
                event = render(message)
                if message.HasField("usage"):
                    yield waiting + (event or b"") + ending.done, False
                    await _ended(call, messages)
                    return
                if event is not None:
                    if held(message):
                        waiting += event
                    else:
                        yield waiting + event, True
                        waiting = b""
                message = await anext(messages, None)
        except grpc.aio.AioRpcError as error:
            api_error = errors.from_rpc_error(error, getattr(request.state, "params", None))
            log.info("gateway.cloud_error_in_stream", code=error.code().name)
            yield waiting + ending.failure(api_error), False
            return
        yield waiting + ending.done, False

    try:
        headers = await rate_limit_headers(call)
    except BaseException:
        watch.stop()
        call.cancel()
        raise
    return CloudStreamResponse(call, events(), headers, watch)


class ClientWatch:
    """Cancels a cloud call as soon as the HTTP client disconnects: one task per
    request, the call's own reads wake the request (they raise CancelledError)."""

    def __init__(self, receive: Receive, call: Cancellable) -> None:
        self.gone = False
        self._task = asyncio.ensure_future(self._watch(receive, call))

    async def _watch(self, receive: Receive, call: Cancellable) -> None:
        await _wait_for_disconnect(receive)
        self.gone = True
        call.cancel()

    def stop(self) -> None:
        """Before the response completes: the server then reports a disconnect too."""
        self._task.cancel()


async def _ended(call: Cancellable, messages: AsyncIterator[Any]) -> None:
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
    write, where StreamingResponse would send an empty part of its own. It is sent
    from the request's own task (Starlette would add a task group with cancel scopes
    to watch for the disconnect; ``watch`` does that, for the whole request)."""

    def __init__(
        self,
        call: Cancellable,
        parts: AsyncIterator[tuple[bytes, bool]],
        headers: dict[str, str],
        watch: ClientWatch,
    ) -> None:
        # The body is ``parts``, which __call__ below sends; StreamingResponse's own
        # content stays empty.
        super().__init__((), media_type=sse.MEDIA_TYPE, headers={**sse.HEADERS, **headers})
        self._call = call
        self._parts = parts
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for part, more in self._parts:
                if not more:
                    self._watch.stop()
                await send({"type": "http.response.body", "body": part, "more_body": more})
        except asyncio.CancelledError:
            if not self._watch.gone:
                raise
            # The client left and the watch cancelled the call: nobody to answer.
            log.info("gateway.stream_cancelled")
        finally:
            self._watch.stop()
            if self._call.cancel():
                log.info("gateway.stream_cancelled")
