"""Node tokens and API keys resolved by the account layer, over gRPC."""

from __future__ import annotations

import grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import node_token_service_pb2 as pb
from resultity.account.v1 import node_token_service_pb2_grpc as pb_grpc

from core.errors import InvalidApiKey, InvalidNodeCredentials
from core.grpc_errors import domain_errors
from core.metadata import bearer_metadata
from server.network.callers import ADMIN_SCOPE, MANAGEMENT_SCOPE


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


class AccountApiKeys:
    """Implements callers.ApiKeyVerifier with the platform's service token. Each call
    asks the account layer, so a revoked key stops at once."""

    def __init__(self, channel: grpc.aio.Channel, service_token: str) -> None:
        self._stub = keys_grpc.ApiKeyServiceStub(channel)
        self._metadata = bearer_metadata(service_token)

    async def scopes_of(self, api_key: str) -> tuple[str, frozenset[str]]:
        with domain_errors():
            response = await self._stub.AuthenticateApiKey(
                keys_pb.AuthenticateApiKeyRequest(secret=api_key), metadata=self._metadata
            )
        key = response.api_key
        return key.account_id, frozenset(_SCOPES.get(scope, "") for scope in key.scopes)


_SCOPES = {
    keys_pb.API_KEY_SCOPE_INFERENCE: "inference",
    keys_pb.API_KEY_SCOPE_MANAGEMENT: MANAGEMENT_SCOPE,
    keys_pb.API_KEY_SCOPE_ADMIN: ADMIN_SCOPE,
    keys_pb.API_KEY_SCOPE_NODE: "node",
}
