"""The gateway over two cloud replicas (scripted clouds over real gRPC, the gateway
over real HTTP): requests spread over both; with one stopped, every request goes
through the other; a stream moves to the other replica when its own failed before
the first response, never after; a unary completion is never sent twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from core import replica_channels
from tests.doubles.scripted_cloud import TEST_API_KEY, ScriptedCloud, start_cloud
from tests.harness import serving_gateway

MODEL = "smollm2-135m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
TEXT = {"model": MODEL, "prompt": "Once upon", "max_tokens": 5}
# A safety net so a regression fails instead of hanging; not a performance threshold.
_WAIT_S = 10


@dataclass
class Replica:
    cloud: ScriptedCloud
    server: grpc.aio.Server
    target: str

    def called(self, method: str) -> int:
        return sum(call.method == method for call in self.cloud.calls)


@dataclass
class Gateway:
    replicas: tuple[Replica, Replica]
    http: httpx.AsyncClient

    async def stop(self, index: int) -> None:
        await self.replicas[index].server.stop(None)


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    # A replica found down stays last for the whole test, however slow the machine.
    monkeypatch.setattr(replica_channels, "DOWN_FOR_S", 3600.0)
    replicas: list[Replica] = []
    try:
        for _ in range(2):
            cloud = ScriptedCloud()
            replicas.append(Replica(cloud, *await start_cloud(cloud)))
        targets = ",".join(replica.target for replica in replicas)
        async with (
            serving_gateway(targets) as base_url,
            httpx.AsyncClient(
                base_url=base_url, headers={"authorization": f"Bearer {TEST_API_KEY}"}
            ) as http,
        ):
            yield Gateway((replicas[0], replicas[1]), http)
    finally:
        for replica in replicas:
            await replica.server.stop(None)


def _events(body: bytes) -> list[dict[str, Any]]:
    data = [line.removeprefix(b"data: ") for line in body.split(b"\n\n") if line]
    assert data[-1] == b"[DONE]"
    return [json.loads(each) for each in data[:-1]]


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        for choice in event.get("choices", ())
    )


async def test_requests_take_the_replicas_in_turn(gateway: Gateway) -> None:
    for _ in range(4):
        assert (await gateway.http.post("/v1/chat/completions", json=CHAT)).status_code == 200

    assert [replica.called("CreateChatCompletion") for replica in gateway.replicas] == [2, 2]


async def test_with_one_replica_stopped_every_request_goes_through_the_other(
    gateway: Gateway,
) -> None:
    await gateway.stop(0)
    # A read finds the stopped replica down (and goes on to the other).
    assert (await gateway.http.get("/v1/models")).status_code == 200

    for _ in range(3):
        answers = [
            await gateway.http.get("/v1/models"),
            await gateway.http.get(f"/v1/models/{MODEL}"),
            await gateway.http.post("/v1/chat/completions", json=CHAT),
            await gateway.http.post("/v1/chat/completions", json={**CHAT, "stream": True}),
            await gateway.http.post("/v1/completions", json=TEXT),
            await gateway.http.post("/v1/completions", json={**TEXT, "stream": True}),
            await gateway.http.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}),
        ]
        assert [answer.status_code for answer in answers] == [200] * len(answers)
    streamed = await gateway.http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert _text(_events(streamed.content)) == "Hello world"


async def test_a_stream_failing_before_its_first_response_moves_to_the_other_replica(
    gateway: Gateway,
) -> None:
    first, second = gateway.replicas
    # A raw UNAVAILABLE, as a replica's transport gives when it goes away.
    first.cloud.script.abort = (grpc.StatusCode.UNAVAILABLE, "going away")

    response = await gateway.http.post("/v1/chat/completions", json={**CHAT, "stream": True})

    assert response.status_code == 200
    assert _text(_events(response.content)) == "Hello world"
    assert (first.called("StreamChatCompletion"), second.called("StreamChatCompletion")) == (1, 1)


async def test_a_unary_completion_is_not_sent_to_a_second_replica(gateway: Gateway) -> None:
    first, second = gateway.replicas
    first.cloud.script.abort = (grpc.StatusCode.UNAVAILABLE, "going away")

    response = await gateway.http.post("/v1/chat/completions", json=CHAT)

    # The replica may have run the job before its connection failed.
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert (first.called("CreateChatCompletion"), second.called("CreateChatCompletion")) == (1, 0)
    # The next one goes to the other replica (the first is now tried last).
    assert (await gateway.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert second.called("CreateChatCompletion") == 1


async def test_a_stream_whose_replica_stops_after_a_response_ends_with_an_error(
    gateway: Gateway,
) -> None:
    for replica in gateway.replicas:
        replica.cloud.script.hang = True  # after the text, until the replica stops
    request = {**CHAT, "stream": True}

    async with gateway.http.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        hanging = [asyncio.ensure_future(r.cloud.hanging.wait()) for r in gateway.replicas]
        done, pending = await asyncio.wait(
            hanging, timeout=_WAIT_S, return_when=asyncio.FIRST_COMPLETED
        )
        for each in pending:
            each.cancel()
        [stopped] = [index for index, waiter in enumerate(hanging) if waiter in done]
        await gateway.stop(stopped)
        body = await response.aread()

    events = _events(body)
    assert _text(events) == "Hello world"
    assert "error" in events[-1]
    # The client had text: the stream was not started again elsewhere.
    other = gateway.replicas[1 - stopped]
    assert other.called("StreamChatCompletion") == 0
