"""The standard gRPC health service and server reflection, on every gRPC server.

Each service name (and the server as a whole, the empty name) answers
NOT_SERVING while its process starts and again once it drains, SERVING in
between; Kubernetes probes and load balancers read it. Reflection lets
grpcurl and partners discover the services without the .proto files.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcHealth:
    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]) -> None:
        self._names = ("", *service_names)
        self._servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        reflection.enable_server_reflection(
            (*self._names[1:], health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def starting(self) -> None:
        for name in self._names:
            await self._servicer.set(name, NOT_SERVING)

    async def serving(self) -> None:
        for name in self._names:
            await self._servicer.set(name, SERVING)

    async def set(self, service_name: str, serving: bool) -> None:
        """One service's own readiness (e.g. the inference service with no model servable)."""
        await self._servicer.set(service_name, SERVING if serving else NOT_SERVING)

    async def draining(self) -> None:
        """Every name NOT_SERVING from now on, whatever is set later."""
        await self._servicer.enter_graceful_shutdown()


def service_names(*modules: ModuleType) -> tuple[str, ...]:
    """The full names of the services the generated ``*_pb2`` modules define."""
    return tuple(
        service.full_name
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
    )
