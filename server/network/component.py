"""The network server's parts, ready to be hosted on a gRPC server."""

from __future__ import annotations

import grpc
from resultity.agent.v1 import agent_service_pb2_grpc
from resultity.network.v1 import dispatch_service_pb2_grpc, node_admin_service_pb2_grpc

from server.common.inference import CatalogModel
from server.network.catalog import DEFAULT_CATALOG, Catalog
from server.network.service import FailoverSettings, LivenessSettings, NetworkService
from server.network.servicer import AgentServicer, DispatchServicer, NodeAdminServicer


class NetworkComponent:
    def __init__(
        self,
        *,
        catalog: tuple[CatalogModel, ...] = DEFAULT_CATALOG,
        liveness: LivenessSettings | None = None,
        failover: FailoverSettings | None = None,
    ) -> None:
        self.service = NetworkService(Catalog(catalog), liveness or LivenessSettings(), failover)

    def register(self, server: grpc.aio.Server) -> None:
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.service), server
        )
        dispatch_service_pb2_grpc.add_DispatchServiceServicer_to_server(
            DispatchServicer(self.service), server
        )
        node_admin_service_pb2_grpc.add_NodeAdminServiceServicer_to_server(
            NodeAdminServicer(self.service), server
        )

    def start(self) -> None:
        self.service.start()

    async def stop(self) -> None:
        """Tells connected agents to reconnect; call before stopping the gRPC server
        (with a grace period) so that the message reaches them."""
        await self.service.stop()
