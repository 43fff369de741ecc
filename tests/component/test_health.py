"""gRPC health and reflection on a service's server, and the gateway's probes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core import channels
from gateway.app import create_app
from gateway.health import INFERENCE_SERVICE
from server.cloud.component import SERVICE_NAMES as CLOUD_SERVICES
from server.common.health import GrpcHealth
from tests.harness import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Served = tuple[GrpcHealth, grpc.aio.Channel, str]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    server = channels.server()
    port = server.add_insecure_port("127.0.0.1:0")
    health = GrpcHealth(server, CLOUD_SERVICES)
    await health.starting()
    await server.start()
    target = f"127.0.0.1:{port}"
    channel = channels.insecure_channel(target)
    try:
        yield health, channel, target
    finally:
        await channel.close(grace=None)
        await server.stop(None)


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)
    )
    return answer.status


async def test_services_are_not_serving_while_starting_then_serving_then_draining(
    served: Served,
) -> None:
    health, channel, _ = served
    names = ("", *CLOUD_SERVICES)
    assert [await _status(channel, name) for name in names] == [NOT_SERVING] * len(names)

    await health.serving()
    assert [await _status(channel, name) for name in names] == [SERVING] * len(names)

    await health.draining()
    await health.set(INFERENCE_SERVICE, serving=True)  # too late: draining wins
    assert [await _status(channel, name) for name in names] == [NOT_SERVING] * len(names)


async def test_an_unknown_service_name_is_not_found(
    served: Served,
) -> None:
    _, channel, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _status(channel, "resultity.nothing.v1.Nothing")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(
    served: Served,
) -> None:
    _, channel, _ = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in stub.ServerReflectionInfo(requests()):
        listed = {service.name for service in answer.list_services_response.service}
        break
    assert set(CLOUD_SERVICES) <= listed
    assert "grpc.health.v1.Health" in listed


async def test_gateway_ready_follows_the_inference_service_health(
    served: Served,
) -> None:
    health, _, target = served
    app = create_app(target)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as http,
    ):
        assert (await http.get("/health")).status_code == 200
        starting = await http.get("/ready")
        assert (starting.status_code, starting.json()["reason"]) == (503, "no model is servable")

        await health.serving()
        ready = await http.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

        await health.set(INFERENCE_SERVICE, serving=False)
        assert (await http.get("/ready")).status_code == 503


async def test_gateway_ready_is_503_when_cloud_is_unreachable() -> None:
    app = create_app(f"127.0.0.1:{free_port()}")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway"
        ) as http,
    ):
        answer = await http.get("/ready")
    assert answer.status_code == 503
    assert answer.json()["reason"].startswith("cloud unreachable")


async def test_gateway_ready_while_any_cloud_replica_serves() -> None:
    servers: list[tuple[GrpcHealth, grpc.aio.Server, str]] = []
    for _ in range(2):
        server = channels.server()
        port = server.add_insecure_port("127.0.0.1:0")
        health = GrpcHealth(server, CLOUD_SERVICES)
        await health.starting()
        await server.start()
        servers.append((health, server, f"127.0.0.1:{port}"))
    (serving, serving_server, first), (_, other_server, second) = servers
    await serving.serving()
    app = create_app(f"{first},{second}")
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway"
            ) as http,
        ):
            # One replica serves, the other is still starting.
            assert (await http.get("/ready")).status_code == 200

            await other_server.stop(None)
            assert (await http.get("/ready")).status_code == 200

            await serving.set(INFERENCE_SERVICE, serving=False)
            reachable = await http.get("/ready")
            assert (reachable.status_code, reachable.json()["reason"]) == (
                503,
                "no model is servable",
            )

            await serving_server.stop(None)
            unreachable = await http.get("/ready")
            assert unreachable.status_code == 503
            assert unreachable.json()["reason"] == "cloud unreachable: UNAVAILABLE"
    finally:
        for _, server, _ in servers:
            await server.stop(None)
