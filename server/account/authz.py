"""Who is calling the account layer, and what they may touch.

A caller presents ``authorization: Bearer <credential>``. The credential is
either an API key (its scopes decide: MANAGEMENT acts on the key's own
account, ADMIN on all) or the platform's service token, which internal
callers (cloud, bootstrap, the operator CLI) read from settings or the data
dir. Every service method takes the resolved Principal and checks it before
touching the store.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from uuid import UUID

from server.common.errors import InvalidApiKey, PermissionDenied

SERVICE_TOKEN_PREFIX = "rst_"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an account's management key, or an admin."""

    account_id: UUID | None
    admin: bool

    @classmethod
    def service(cls) -> Principal:
        return cls(None, True)

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("This operation needs admin rights")

    def require_access(self, account_id: UUID) -> None:
        """Passes for admins and for the account itself."""
        if not self.admin and self.account_id != account_id:
            raise PermissionDenied("You may only act on your own account")


def generate_service_token() -> str:
    return SERVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_service_token(credential: str, service_token: str) -> bool:
    return hmac.compare_digest(credential.encode(), service_token.encode())


def bearer_credential(authorization: str | None) -> str:
    if not authorization:
        raise InvalidApiKey("No credentials (authorization: Bearer <API key>)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidApiKey("The authorization metadata must be 'Bearer <API key>'")
    return token.strip()


def service_metadata(service_token: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata that authenticates an internal caller."""
    return (("authorization", f"Bearer {service_token}"),)
