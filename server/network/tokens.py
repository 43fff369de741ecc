"""Node tokens resolved by the account layer (NodeTokenService), over gRPC."""

from __future__ import annotations

import grpc
from resultity.account.v1 import node_token_service_pb2 as pb
from resultity.account.v1 import node_token_service_pb2_grpc as pb_grpc

from core.errors import InvalidApiKey, InvalidNodeCredentials
from core.grpc_errors import domain_errors
from core.metadata import bearer_metadata


class AccountNodeTokens:
    """Implements NodeTokenVerifier with the platform's service token."""

    def __init__(self, channel: grpc.aio.Channel, service_token: str) -> None:
        self._stub = pb_grpc.NodeTokenServiceStub(channel)
        self._metadata = bearer_metadata(service_token)

    async def operator_of(self, node_token: str) -> str:
        try:
            with domain_errors():
                response = await self._stub.AuthenticateNodeToken(
                    pb.AuthenticateNodeTokenRequest(secret=node_token), metadata=self._metadata
                )
        except InvalidApiKey:
            raise InvalidNodeCredentials("the node token is not valid") from None
        return response.node_token.account_id
