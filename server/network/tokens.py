"""Node tokens and API keys resolved by the account layer, over gRPC."""

from __future__ import annotations

from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import node_token_service_pb2 as pb
from resultity.account.v1 import node_token_service_pb2_grpc as pb_grpc

from core.errors import InvalidApiKey, InvalidNodeCredentials
from core.grpc_errors import domain_errors
from core.metadata import bearer_metadata
from core.replica_channels import ReplicaChannels
from server.network.callers import ADMIN_SCOPE, MANAGEMENT_SCOPE


class AccountNodeTokens:
    """Implements NodeTokenVerifier with the platform's service token."""

    def __init__(self, replicas: ReplicaChannels, service_token: str) -> None:
        self._tokens = replicas.stubs(pb_grpc.NodeTokenServiceStub)
        self._metadata = bearer_metadata(service_token)

    async def operator_of(self, node_token: str) -> str:
        request = pb.AuthenticateNodeTokenRequest(secret=node_token)
        try:
            with domain_errors():
                # A read: any account replica answers it.
                response = await self._tokens.call(
                    lambda tokens: tokens.AuthenticateNodeToken(request, metadata=self._metadata)
                )
        except InvalidApiKey:
            raise InvalidNodeCredentials("the node token is not valid") from None
        return response.node_token.account_id


class AccountApiKeys:
    """Implements callers.ApiKeyVerifier with the platform's service token. Each call
    asks the account layer, so a revoked key stops at once."""

    def __init__(self, replicas: ReplicaChannels, service_token: str) -> None:
        self._keys = replicas.stubs(keys_grpc.ApiKeyServiceStub)
        self._metadata = bearer_metadata(service_token)

    async def scopes_of(self, api_key: str) -> tuple[str, frozenset[str]]:
        request = keys_pb.AuthenticateApiKeyRequest(secret=api_key)
        with domain_errors():
            response = await self._keys.call(
                lambda keys: keys.AuthenticateApiKey(request, metadata=self._metadata)
            )
        key = response.api_key
        return key.account_id, frozenset(_SCOPES.get(scope, "") for scope in key.scopes)


_SCOPES = {
    keys_pb.API_KEY_SCOPE_INFERENCE: "inference",
    keys_pb.API_KEY_SCOPE_MANAGEMENT: MANAGEMENT_SCOPE,
    keys_pb.API_KEY_SCOPE_ADMIN: ADMIN_SCOPE,
    keys_pb.API_KEY_SCOPE_NODE: "node",
}
