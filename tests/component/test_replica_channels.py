"""Calls to a service given as several replica addresses: spread in turn, passed on
from an unreachable replica when a second delivery is harmless, never when the
service itself answered, and kept from a replica whose channel lost it; and a
cloud whose first account and network replicas are down serves and bills every
request through the others."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from core.errors import NoCapacity
from core.grpc_errors import to_status
from core.inference import ChatMessage, ChatRole
from core.replica_channels import ReplicaChannels, ReplicatedStub, unreachable
from server.cloud.component import CloudComponent
from server.cloud.pricing import cost
from server.cloud.requests import ChatRequest, CompletionFinished
from tests.doubles.scripted_runtime import MODEL_ID, ScriptedRuntime
from tests.harness import Platform, free_port, running_platform

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CHECK = health_pb2.HealthCheckRequest()


@contextlib.asynccontextmanager
async def _replica(
    status: health_pb2.HealthCheckResponse.ServingStatus.ValueType,
) -> AsyncIterator[tuple[str, grpc.aio.Server]]:
    """A server whose health service answers ``status``: which replica answered."""
    server = grpc.aio.server()
    servicer = health_aio.HealthServicer()
    await servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        await server.stop(None)


def _dead() -> str:
    return f"127.0.0.1:{free_port()}"


class Tried:
    """The health stubs of some replicas and the replicas each call tried, by index."""

    def __init__(self, addresses: str) -> None:
        self.replicas = ReplicaChannels(addresses)
        self._made: list[health_pb2_grpc.HealthStub] = []
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: ReplicatedStub[health_pb2_grpc.HealthStub] = self.replicas.stubs(self._stub)
        self.indexes: list[int] = []

    def _stub(self, channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
        self.channels.append(channel)
        self._made.append(health_pb2_grpc.HealthStub(channel))
        return self._made[-1]

    def check(
        self, request: health_pb2.HealthCheckRequest = CHECK
    ) -> Callable[[health_pb2_grpc.HealthStub], Awaitable[health_pb2.HealthCheckResponse]]:
        async def attempt(stub: health_pb2_grpc.HealthStub) -> health_pb2.HealthCheckResponse:
            self.indexes.append(self._made.index(stub))
            response: health_pb2.HealthCheckResponse = await stub.Check(request)
            return response

        return attempt

    def watch(
        self, stub: health_pb2_grpc.HealthStub
    ) -> grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
        self.indexes.append(self._made.index(stub))
        call: grpc.aio.UnaryStreamCall[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = stub.Watch(CHECK)
        return call


@pytest.fixture
async def tried() -> AsyncIterator[Callable[[str], Tried]]:
    made: list[Tried] = []

    def make(addresses: str) -> Tried:
        made.append(Tried(addresses))
        return made[-1]

    yield make
    for each in made:
        await each.replicas.close()


async def test_calls_take_the_replicas_in_turn(tried: Callable[[str], Tried]) -> None:
    async with _replica(SERVING) as (first, _), _replica(NOT_SERVING) as (second, _):
        calls = tried(f"{first}, {second}")
        answers = [(await calls.stubs.call(calls.check())).status for _ in range(4)]
    assert answers == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]
    assert calls.indexes == [0, 1, 0, 1]


async def test_an_unreachable_replica_passes_the_call_on_and_then_comes_last(
    tried: Callable[[str], Tried],
) -> None:
    async with _replica(SERVING) as (live, _):
        calls = tried(f"{_dead()},{live}")
        answers = [(await calls.stubs.call(calls.check())).status for _ in range(4)]
    assert answers == [SERVING] * 4
    # Found down on the first call, the dead replica is not tried again meanwhile.
    assert calls.indexes == [0, 1, 1, 1, 1]


async def test_a_service_error_is_the_answer(tried: Callable[[str], Tried]) -> None:
    async with _replica(SERVING) as (first, _), _replica(SERVING) as (second, _):
        calls = tried(f"{first},{second}")
        unknown = health_pb2.HealthCheckRequest(service="unknown")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await calls.stubs.call(calls.check(unknown))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert calls.indexes == [0]


async def test_a_call_made_once_is_not_passed_on(tried: Callable[[str], Tried]) -> None:
    async with _replica(SERVING) as (live, _):
        calls = tried(f"{_dead()},{live}")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await calls.stubs.call(calls.check(), again=False)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        # The next call made once goes to the replica that is up.
        assert (await calls.stubs.call(calls.check(), again=False)).status == SERVING
    assert calls.indexes == [0, 1]


async def test_a_replica_whose_channel_lost_its_server_is_skipped_before_a_call_fails(
    tried: Callable[[str], Tried],
) -> None:
    async with _replica(SERVING) as (first, first_server), _replica(NOT_SERVING) as (second, _):
        calls = tried(f"{first},{second}")
        assert (await calls.stubs.call(calls.check())).status == SERVING
        assert (await calls.stubs.call(calls.check())).status == NOT_SERVING
        await first_server.stop(None)
        # The first replica died; no call of ours failed on it, but its channel
        # found it gone and cannot reconnect. The timeout bounds a broken test.
        channel = calls.channels[0]
        async with asyncio.timeout(10):
            while (state := channel.get_state()) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                await channel.wait_for_state_change(state)
        # Its turns go to the live replica, the calls sent once among them.
        assert (await calls.stubs.call(calls.check(), again=False)).status == NOT_SERVING
        assert (await calls.stubs.call(calls.check())).status == NOT_SERVING
        assert (await calls.stubs.call(calls.check(), again=False)).status == NOT_SERVING
    assert calls.indexes == [0, 1, 1, 1, 1]


async def test_no_replica_reachable_is_unavailable(tried: Callable[[str], Tried]) -> None:
    calls = tried(f"{_dead()},{_dead()}")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await calls.stubs.call(calls.check())
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert calls.indexes == [0, 1]


async def test_each_replica_is_asked_and_the_unreachable_then_come_last(
    tried: Callable[[str], Tried],
) -> None:
    async with _replica(SERVING) as (first, _), _replica(NOT_SERVING) as (second, _):
        calls = tried(f"{_dead()},{first},{second}")
        dead, serving, not_serving = await calls.stubs.each(calls.check())
        assert isinstance(dead, grpc.aio.AioRpcError)
        assert dead.code() == grpc.StatusCode.UNAVAILABLE
        assert (serving, not_serving) == (
            health_pb2.HealthCheckResponse(status=SERVING),
            health_pb2.HealthCheckResponse(status=NOT_SERVING),
        )
        assert sorted(calls.indexes) == [0, 1, 2]
        # Found down by the probe, the dead replica takes no call in its turn.
        assert (await calls.stubs.call(calls.check(), again=False)).status == SERVING
    assert calls.indexes[3:] == [1]


async def test_a_stream_moves_on_before_its_first_response_only(
    tried: Callable[[str], Tried],
) -> None:
    async with _replica(SERVING) as (first, first_server), _replica(SERVING) as (second, _):
        calls = tried(f"{_dead()},{first},{second}")
        responses = calls.stubs.stream(calls.watch)
        async with contextlib.aclosing(responses):
            assert (await anext(responses)).status == SERVING
            await first_server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError):
                await anext(responses)
    # The dead replica passed it on; the one that had answered was not replaced.
    assert calls.indexes == [0, 1]


def test_only_a_transport_failure_counts_as_unreachable() -> None:
    def error(code: grpc.StatusCode, trailing: grpc.aio.Metadata) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "details", None)

    status = to_status(NoCapacity("no ready node serves the model"))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert unreachable(error(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata()))
    assert not unreachable(
        error(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(*status.trailing_metadata))
    )
    assert not unreachable(error(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata()))


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as platform:
        yield platform


async def test_a_cloud_serves_and_bills_through_the_replicas_that_are_up(
    platform: Platform, postgres_dsn: str
) -> None:
    await platform.start_agent(ScriptedRuntime(), "node")
    customer = await platform.customer(credits=1_000_000)
    [(_, bearer)] = platform.service
    # Each service's first replica is down: the first calls find it so and go on.
    cloud = await CloudComponent.start(
        postgres_dsn,
        account_target=f"{_dead()},{platform.target}",
        network_target=f"{_dead()},{platform.target}",
        service_token=bearer.removeprefix("Bearer "),
    )
    request = ChatRequest(model=MODEL_ID, messages=(ChatMessage(ChatRole.USER, "hello there"),))
    try:
        price = (await cloud.inference.models.get(MODEL_ID)).price
        charged = 0
        for turn in range(3):
            events = cloud.inference.stream(f"Bearer {customer.api_key}", request, f"req-{turn}")
            finished = [event async for event in events][-1]
            assert isinstance(finished, CompletionFinished)
            assert finished.charged == cost(price, finished.usage) > 0
            charged += finished.charged
    finally:
        await cloud.stop()
    balance = await platform.balance(customer)
    assert (balance.available_micro_credits, balance.held_micro_credits) == (
        1_000_000 - charged,
        0,
    )
