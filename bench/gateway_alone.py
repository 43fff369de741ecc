"""`python -m bench.gateway_alone`: the HTTP gateway's own CPU per streamed request.

The gateway app (`create_app`) served by uvicorn as `gateway.server.serve` runs it,
in a spawned process of its own, in front of a cloud stub in that process that
answers at once, without gRPC: the messages a streamed chat completion of 16 tokens
gets from cloud in `bench.gateway` (the role, one token, fifteen tokens, the finish
reason, usage: five messages, or three to a gateway that asks for the events ready
together in one, `batch_events`: the role; the tokens and the finish; usage).
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
from multiprocessing.connection import Connection
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from bench.http_client import HttpConnection
from core.event_loop import run
from core.logging import configure_logging
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


class _InstantStream:
    """A streamed cloud call whose messages are all there: one per loop iteration."""

    def __init__(self, messages: tuple[pb.StreamChatCompletionResponse, ...]) -> None:
        self._messages = self._each(messages)

    async def _each(
        self, messages: tuple[pb.StreamChatCompletionResponse, ...]
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        for message in messages:
            await asyncio.sleep(0)
            yield message

    def __aiter__(self) -> AsyncIterator[pb.StreamChatCompletionResponse]:
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


def _gateway_main(port: int, pipe: Connection) -> None:
    configure_logging("warning")

    async def main() -> None:
        app = create_app("127.0.0.1:1")  # the channel is never used
        started = asyncio.Event()
        serving = asyncio.ensure_future(serve(app, "127.0.0.1", port, started=started))
        await started.wait()
        app.state.cloud = _InstantCloud()
        loop = asyncio.get_running_loop()
        pipe.send("ready")
        while await loop.run_in_executor(None, pipe.recv) == "cpu":
            times = os.times()
            pipe.send(times.user + times.system)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    run(main())


async def _load(port: int, streams: int, seconds: float) -> int:
    body = {
        "model": _MODEL,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    deadline = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        connection = HttpConnection(url, json.dumps(body).encode(), headers)
        try:
            while time.monotonic() < deadline:
                response = await connection.post()
                if response.status != 200 or not response.body.endswith(b"data: [DONE]\n\n"):
                    raise RuntimeError(f"HTTP {response.status}: {response.body[-200:]!r}")
                done += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(streams)))
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=18_431)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    gateway = context.Process(target=_gateway_main, args=(args.port, theirs))
    gateway.start()
    try:
        if ours.recv() != "ready":
            raise RuntimeError("the gateway did not start")
        asyncio.run(_load(args.port, args.streams, 1.0))  # warm-up
        per_request = []
        for _ in range(args.rounds):
            ours.send("cpu")
            before = ours.recv()
            requests = asyncio.run(_load(args.port, args.streams, args.seconds))
            ours.send("cpu")
            per_request.append((ours.recv() - before) / requests * 1e6)
            print(f"{requests} requests, gateway CPU {per_request[-1]:.1f} µs per request")
    finally:
        ours.send("stop")
        gateway.join(10)
    print(
        f"gateway CPU per request at {args.streams} streams: median "
        f"{statistics.median(per_request):.1f} µs, min {min(per_request):.1f} µs "
        f"(load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
