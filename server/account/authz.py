"""Who is calling the account layer, and what they may touch.

A caller presents ``authorization: Bearer <credential>``. The credential is
either an API key (its scopes decide: MANAGEMENT acts on the key's own
account, ADMIN on all) or the platform's service token, which internal
callers (cloud, bootstrap, the operator CLI) read from settings or the data
dir. Every service method takes the resolved Principal and checks it before
touching the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from core.errors import PermissionDenied


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an account's management key, an admin key, or
    the platform's own services (the service token)."""

    account_id: UUID | None
    admin: bool
    platform_service: bool = False

    @classmethod
    def service(cls) -> Principal:
        return cls(None, True, platform_service=True)

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("This operation needs admin rights")

    def require_platform_service(self, what: str) -> None:
        """For what only the platform's services decide (checks made elsewhere first)."""
        if not self.platform_service:
            raise PermissionDenied(f"Only the platform's services may {what}")

    def require_access(self, account_id: UUID) -> None:
        """Passes for admins and for the account itself."""
        if not self.admin and self.account_id != account_id:
            raise PermissionDenied("You may only act on your own account")
