"""`python -m bench.gateway_alone`: the HTTP gateway's own CPU per streamed request.

The gateway app (`create_app`) served by uvicorn as `gateway.server.serve` runs it,
in a spawned process of its own, in front of a cloud stub in that process that
answers at once, without gRPC: the messages a streamed chat completion of 16 tokens
gets from cloud in `bench.gateway` (the role, one token, fifteen tokens, the finish
reason, usage: five messages, or three to a gateway that asks for the events ready
together in one, `batch_events`: the role; the tokens and the finish; usage).
``--api`` picks the endpoint: chat completions (the default), text completions (the
same tokens; the stream opens with a message of no delta instead of the role) or
the Responses API (over the chat completion's messages).
``--streams`` keep-alive connections (bench/http_client.py) post
requests back to back for ``--seconds``, ``--rounds`` times; each round reports the
gateway process's CPU time (user + system) per request. Nothing else runs in that
process, so this isolates what bench.gateway charges to the gateway (HTTP parsing,
middleware, routing, validation, conversions, SSE, socket writes) from the gRPC
services behind it, with far less noise on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from bench.http_client import HttpConnection
from core.event_loop import run
from core.logging import configure_logging
from core.replica_channels import ReplicaChannels, ReplicatedStub
from gateway.app import create_app
from gateway.server import serve

_MODEL = "smollm2-135m"
_HEADER: dict[str, Any] = {
    "id": "chatcmpl-0123456789abcdef0123456789abcdef",
    "model": _MODEL,
    "created": Timestamp(seconds=1_700_000_000),
}
_ROLE = pb.ChatCompletionDelta(role=inference_pb2.CHAT_ROLE_ASSISTANT)
_TOKENS = (pb.ChatCompletionDelta(content="tok"), pb.ChatCompletionDelta(content="tok" * 15))
_FINISH = pb.ChatCompletionDelta(finish_reason=inference_pb2.FINISH_REASON_LENGTH)
_USAGE = pb.StreamChatCompletionResponse(
    usage=inference_pb2.Usage(prompt_tokens=7, completion_tokens=16),
    billing=pb.Billing(charged_micro_credits=42),
    **_HEADER,
)
_SINGLE_EVENTS = (
    *(pb.StreamChatCompletionResponse(choices=[delta], **_HEADER) for delta in (_ROLE, *_TOKENS)),
    pb.StreamChatCompletionResponse(choices=[_FINISH], **_HEADER),
    _USAGE,
)
# Cloud relays the node's tokens and its finish together (the agent reports them in
# one batch, the network relays them in one message).
_READY_TOGETHER = (
    pb.StreamChatCompletionResponse(choices=[_ROLE], **_HEADER),
    pb.StreamChatCompletionResponse(choices=[*_TOKENS, _FINISH], **_HEADER),
    _USAGE,
)
_TEXT_HEADER = {**_HEADER, "id": "cmpl-0123456789abcdef0123456789abcdef"}
_TEXT_TOKENS = (pb.CompletionDelta(text="tok"), pb.CompletionDelta(text="tok" * 15))
_TEXT_FINISH = pb.CompletionDelta(finish_reason=inference_pb2.FINISH_REASON_LENGTH)
_TEXT_USAGE = pb.StreamCompletionResponse(
    usage=_USAGE.usage, billing=_USAGE.billing, **_TEXT_HEADER
)
_TEXT_SINGLE_EVENTS = (
    pb.StreamCompletionResponse(**_TEXT_HEADER),
    *(pb.StreamCompletionResponse(choices=[delta], **_TEXT_HEADER) for delta in _TEXT_TOKENS),
    pb.StreamCompletionResponse(choices=[_TEXT_FINISH], **_TEXT_HEADER),
    _TEXT_USAGE,
)
_TEXT_READY_TOGETHER = (
    pb.StreamCompletionResponse(**_TEXT_HEADER),
    pb.StreamCompletionResponse(choices=[*_TEXT_TOKENS, _TEXT_FINISH], **_TEXT_HEADER),
    _TEXT_USAGE,
)
_Message = pb.StreamChatCompletionResponse | pb.StreamCompletionResponse


class _InstantStream:
    """A streamed cloud call whose messages are all there: one per loop iteration."""

    def __init__(self, messages: tuple[_Message, ...]) -> None:
        self._messages = self._each(messages)

    async def _each(self, messages: tuple[_Message, ...]) -> AsyncIterator[_Message]:
        for message in messages:
            await asyncio.sleep(0)
            yield message

    def __aiter__(self) -> AsyncIterator[_Message]:
        return self._messages

    async def initial_metadata(self) -> tuple[()]:
        return ()

    def cancel(self) -> bool:
        return False


class _InstantCloud:
    def StreamChatCompletion(
        self, request: pb.StreamChatCompletionRequest, metadata: Any = None
    ) -> _InstantStream:
        return _InstantStream(_READY_TOGETHER if request.batch_events else _SINGLE_EVENTS)

    def StreamCompletion(
        self, request: pb.StreamCompletionRequest, metadata: Any = None
    ) -> _InstantStream:
        return _InstantStream(_TEXT_READY_TOGETHER if request.batch_events else _TEXT_SINGLE_EVENTS)


@dataclass(frozen=True)
class _Api:
    path: str
    body: dict[str, Any]
    # How the last event of a whole response's body starts.
    last_event: bytes


_APIS = {
    "chat": _Api(
        "/v1/chat/completions",
        {
            "model": _MODEL,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        b"data: [DONE]",
    ),
    "completions": _Api(
        "/v1/completions",
        {
            "model": _MODEL,
            "prompt": "Say something.",
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        b"data: [DONE]",
    ),
    # The length finish ends the response as incomplete; its event is the last.
    "responses": _Api(
        "/v1/responses",
        {"model": _MODEL, "input": "Say something.", "max_output_tokens": 16, "stream": True},
        b"event: response.incomplete\n",
    ),
}


def _gateway_main(port: int, pipe: Connection) -> None:
    configure_logging("warning")

    async def main() -> None:
        app = create_app("127.0.0.1:1")  # the channel is never used
        started = asyncio.Event()
        serving = asyncio.ensure_future(serve(app, "127.0.0.1", port, started=started))
        await started.wait()
        app.state.cloud = ReplicatedStub(ReplicaChannels("127.0.0.1:1"), (_InstantCloud(),))
        loop = asyncio.get_running_loop()
        pipe.send("ready")
        while await loop.run_in_executor(None, pipe.recv) == "cpu":
            times = os.times()
            pipe.send(times.user + times.system)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    run(main())


async def _load(port: int, api: _Api, streams: int, seconds: float) -> int:
    headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
    url = f"http://127.0.0.1:{port}{api.path}"
    deadline = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        connection = HttpConnection(url, json.dumps(api.body).encode(), headers)
        try:
            while time.monotonic() < deadline:
                response = await connection.post()
                last_event = response.body.rsplit(b"\n\n", 2)[-2]
                if response.status != 200 or not last_event.startswith(api.last_event):
                    raise RuntimeError(f"HTTP {response.status}: {response.body[-200:]!r}")
                done += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(streams)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", choices=sorted(_APIS), default="chat")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=18_431)
    args = parser.parse_args()
    api = _APIS[args.api]
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    gateway = context.Process(target=_gateway_main, args=(args.port, theirs))
    gateway.start()
    try:
        if ours.recv() != "ready":
            raise RuntimeError("the gateway did not start")
        asyncio.run(_load(args.port, api, args.streams, 1.0))  # warm-up
        per_request = []
        for _ in range(args.rounds):
            ours.send("cpu")
            before = ours.recv()
            requests = asyncio.run(_load(args.port, api, args.streams, args.seconds))
            ours.send("cpu")
            per_request.append((ours.recv() - before) / requests * 1e6)
            print(f"{requests} requests, gateway CPU {per_request[-1]:.1f} µs per request")
    finally:
        ours.send("stop")
        gateway.join(10)
    print(
        f"gateway CPU per {args.api} request at {args.streams} streams: median "
        f"{statistics.median(per_request):.1f} µs, min {min(per_request):.1f} µs "
        f"(load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
