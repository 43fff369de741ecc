"""The network server's parts, ready to be hosted on a gRPC server."""

from __future__ import annotations

import grpc
from resultity.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from resultity.network.v1 import (
    dispatch_service_pb2,
    dispatch_service_pb2_grpc,
    node_admin_service_pb2,
    node_admin_service_pb2_grpc,
)

from core import channels
from core.inference import CatalogModel
from server.common.health import service_names
from server.network.admin_servicer import NodeAdminServicer
from server.network.admission import AdmissionSettings, NodeAdmission
from server.network.callers import ServiceCallers
from server.network.catalog import DEFAULT_CATALOG, Catalog
from server.network.service import (
    FailoverSettings,
    LivenessSettings,
    NetworkService,
    ValidationSettings,
)
from server.network.servicer import AgentServicer, DispatchServicer
from server.network.tokens import AccountNodeTokens

SERVICE_NAMES = service_names(agent_service_pb2, dispatch_service_pb2, node_admin_service_pb2)


class NetworkComponent:
    def __init__(
        self,
        *,
        catalog: tuple[CatalogModel, ...] = DEFAULT_CATALOG,
        liveness: LivenessSettings | None = None,
        failover: FailoverSettings | None = None,
        admission: AdmissionSettings | None = None,
        validation: ValidationSettings | None = None,
        account_target: str | None = None,
        service_token: str,
    ) -> None:
        """Callers of the dispatch and node admin APIs must present ``service_token``.
        With ``account_target`` node tokens are resolved by that account server (with
        the same token); without, tokens are not checked and nodes earn nothing."""
        self._callers = ServiceCallers(service_token)
        self._account_channel = (
            None if account_target is None else channels.insecure_channel(account_target)
        )
        tokens = (
            None
            if self._account_channel is None
            else AccountNodeTokens(self._account_channel, service_token)
        )
        self.service = NetworkService(
            Catalog(catalog),
            liveness or LivenessSettings(),
            failover,
            NodeAdmission(admission or AdmissionSettings(), tokens),
            validation,
        )

    def register(self, server: grpc.aio.Server) -> None:
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.service), server
        )
        dispatch_service_pb2_grpc.add_DispatchServiceServicer_to_server(
            DispatchServicer(self.service, self._callers), server
        )
        node_admin_service_pb2_grpc.add_NodeAdminServiceServicer_to_server(
            NodeAdminServicer(self.service, self._callers), server
        )

    def start(self) -> None:
        self.service.start()

    async def stop(self) -> None:
        """Tells connected agents to reconnect; call before stopping the gRPC server
        (with a grace period) so that the message reaches them."""
        await self.service.stop()
        if self._account_channel is not None:
            await self._account_channel.close(grace=None)
