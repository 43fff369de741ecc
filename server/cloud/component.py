"""The cloud server's parts, wired to the account and network services."""

from __future__ import annotations

import grpc
from resultity.cloud.v1 import inference_service_pb2_grpc

from server.cloud.chat import ChatService
from server.cloud.clients import GrpcAccountClient, GrpcNetworkClient
from server.cloud.rate_limits import RateLimitSettings
from server.cloud.servicer import InferenceServicer
from server.common.channels import insecure_channel


class CloudComponent:
    def __init__(
        self,
        *,
        account_target: str,
        network_target: str,
        service_token: str,
        rate_limits: RateLimitSettings | None = None,
    ) -> None:
        """``rate_limits`` unset: read from the RESULTITY_RATE_LIMIT_* environment."""
        self._account_channel = insecure_channel(account_target)
        self._network_channel = insecure_channel(network_target)
        self.chat = ChatService(
            GrpcAccountClient(self._account_channel, service_token),
            GrpcNetworkClient(self._network_channel),
            rate_limits=rate_limits or RateLimitSettings(),
        )

    def register(self, server: grpc.aio.Server) -> None:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.chat), server
        )

    async def stop(self) -> None:
        await self.chat.drain()
        await self._account_channel.close(grace=None)
        await self._network_channel.close(grace=None)
