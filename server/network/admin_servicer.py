"""gRPC transport of the node admin API: list, inspect, drain, quarantine and release nodes,
on every replica of the network (node_actions.py); read and update the network
configuration and list its acknowledgements. Callers present the platform's
service token or an admin key; an operator's management key reads its own nodes
(callers.py)."""

from __future__ import annotations

import base64
import binascii
import time

import grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from core.errors import InvalidArgument, NotFound
from core.grpc_errors import translate_errors
from server.common.paging import page_size
from server.common.transport import authorization, timestamp_to_pb
from server.network.callers import ServiceCallers, admin_only
from server.network.convert import config_from_pb, config_to_pb, fleet_node_to_pb
from server.network.node_actions import Drain, NodeAction, Quarantine, Release
from server.network.nodes import NodeSession
from server.network.remote_nodes import RemoteNode
from server.network.service import NetworkService


class NodeAdminServicer(admin_grpc.NodeAdminServiceServicer):
    def __init__(self, service: NetworkService, callers: ServiceCallers) -> None:
        self._service = service
        self.callers = callers

    @translate_errors
    async def ListNodes(
        self,
        request: admin_pb.ListNodesRequest,
        context: grpc.aio.ServicerContext[admin_pb.ListNodesRequest, admin_pb.ListNodesResponse],
    ) -> admin_pb.ListNodesResponse:
        viewer = await self.callers.viewer(authorization(context))
        return admin_pb.ListNodesResponse(
            nodes=[
                self._node(node)
                for node in self._service.fleet_nodes()
                if viewer.sees(node.operator_account_id)
            ]
        )

    def _node(self, node: NodeSession | RemoteNode) -> admin_pb.Node:
        service = self._service
        return fleet_node_to_pb(
            node, time.monotonic(), service.liveness.suspect_s, service.replica_id
        )

    @translate_errors
    async def GetNode(
        self,
        request: admin_pb.GetNodeRequest,
        context: grpc.aio.ServicerContext[admin_pb.GetNodeRequest, admin_pb.GetNodeResponse],
    ) -> admin_pb.GetNodeResponse:
        viewer = await self.callers.viewer(authorization(context))
        node = self._service.fleet_node(request.node_id)
        if not viewer.sees(node.operator_account_id):
            # As for a node that is not here: others' nodes are not even confirmed.
            raise NotFound(f"node {request.node_id} is not connected")
        return admin_pb.GetNodeResponse(node=self._node(node))

    async def _act(self, node_id: str, action: NodeAction) -> admin_pb.Node | None:
        node = await self._service.act(node_id, action)
        return None if node is None else self._node(node)

    @translate_errors
    @admin_only
    async def DrainNode(
        self,
        request: admin_pb.DrainNodeRequest,
        context: grpc.aio.ServicerContext[admin_pb.DrainNodeRequest, admin_pb.DrainNodeResponse],
    ) -> admin_pb.DrainNodeResponse:
        return admin_pb.DrainNodeResponse(node=await self._act(request.node_id, Drain()))

    @translate_errors
    @admin_only
    async def QuarantineNode(
        self,
        request: admin_pb.QuarantineNodeRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.QuarantineNodeRequest, admin_pb.QuarantineNodeResponse
        ],
    ) -> admin_pb.QuarantineNodeResponse:
        node = await self._act(request.node_id, Quarantine(request.reason))
        return admin_pb.QuarantineNodeResponse(node=node)

    @translate_errors
    @admin_only
    async def ReleaseNode(
        self,
        request: admin_pb.ReleaseNodeRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.ReleaseNodeRequest, admin_pb.ReleaseNodeResponse
        ],
    ) -> admin_pb.ReleaseNodeResponse:
        return admin_pb.ReleaseNodeResponse(node=await self._act(request.node_id, Release()))

    @translate_errors
    @admin_only
    async def GetNetworkConfig(
        self,
        request: admin_pb.GetNetworkConfigRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.GetNetworkConfigRequest, admin_pb.GetNetworkConfigResponse
        ],
    ) -> admin_pb.GetNetworkConfigResponse:
        return admin_pb.GetNetworkConfigResponse(config=config_to_pb(self._service.config))

    @translate_errors
    @admin_only
    async def UpdateNetworkConfig(
        self,
        request: admin_pb.UpdateNetworkConfigRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.UpdateNetworkConfigRequest, admin_pb.UpdateNetworkConfigResponse
        ],
    ) -> admin_pb.UpdateNetworkConfigResponse:
        config = await self._service.update_config(
            config_from_pb(request.config), request.expected_version
        )
        return admin_pb.UpdateNetworkConfigResponse(config=config_to_pb(config))

    @translate_errors
    @admin_only
    async def ListConfigAcks(
        self,
        request: admin_pb.ListConfigAcksRequest,
        context: grpc.aio.ServicerContext[
            admin_pb.ListConfigAcksRequest, admin_pb.ListConfigAcksResponse
        ],
    ) -> admin_pb.ListConfigAcksResponse:
        limit = page_size(request.page_size)
        version, acks = await self._service.config_acks(
            request.version, _after_node(request.page_token), limit
        )
        return admin_pb.ListConfigAcksResponse(
            version=version,
            acks=[
                admin_pb.ConfigAck(
                    node_id=ack.node_id,
                    version=ack.version,
                    acked_at=timestamp_to_pb(ack.acked_at),
                )
                for ack in acks
            ],
            next_page_token=_page_token(acks[-1].node_id) if len(acks) == limit else "",
        )


def _page_token(node_id: str) -> str:
    return base64.urlsafe_b64encode(node_id.encode()).decode()


def _after_node(token: str) -> str:
    """The last node id of the previous page; empty for the first."""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument("page_token is not valid", field="page_token") from None
