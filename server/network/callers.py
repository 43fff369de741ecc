"""Who may call the network's dispatch, replica and node admin APIs.

Running jobs and the replicas' forwarding are for the platform's own services:
callers present the platform's service token (the one the account layer
accepts) as ``authorization: Bearer <token>``; anything else fails with
UNAUTHENTICATED and ErrorInfo reason INVALID_API_KEY before the method runs.

The node admin API also takes API keys, which the account layer resolves
(``ApiKeyVerifier``): a key with the admin scope acts as the service token
does; a key with the management scope is its account's operator, who may read
that account's nodes and nothing else. Agents do not come through here: their
stream is authenticated by its signed hello and node token (admission.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc

from core.errors import InvalidApiKey, PermissionDenied
from server.common.credentials import bearer_credential, is_service_token
from server.common.transport import authorization

# Scopes as the account layer names them (api_keys.Scope values).
ADMIN_SCOPE = "admin"
MANAGEMENT_SCOPE = "management"


class ApiKeyVerifier(Protocol):
    async def scopes_of(self, api_key: str) -> tuple[str, frozenset[str]]:
        """The key's account and scopes; raises InvalidApiKey for a key that does not
        authenticate."""
        ...


@dataclass(frozen=True, slots=True)
class NodeViewer:
    """A caller of the node admin API: the platform (or an admin), or one operator."""

    operator_account_id: str | None

    @property
    def admin(self) -> bool:
        return self.operator_account_id is None

    def require_admin(self) -> None:
        if not self.admin:
            raise PermissionDenied("This operation needs admin rights")

    def sees(self, operator_account_id: str) -> bool:
        """Whether a node of this operator is the caller's to see."""
        return self.admin or operator_account_id == self.operator_account_id


PLATFORM = NodeViewer(None)


class ServiceCallers:
    def __init__(self, service_token: str, keys: ApiKeyVerifier | None = None) -> None:
        """``keys``: how API keys are resolved; without, only the service token passes."""
        if not service_token:
            raise ValueError("the network needs the platform's service token")
        self._service_token = service_token
        self._keys = keys

    def check(self, authorization: str | None) -> None:
        """Passes for the service token; raises InvalidApiKey otherwise."""
        if not is_service_token(bearer_credential(authorization), self._service_token):
            raise InvalidApiKey(
                "the network's dispatch and replica APIs accept only the platform's service token"
            )

    async def viewer(self, authorization: str | None) -> NodeViewer:
        """The node admin API's caller: the service token, an admin key or an operator's
        management key; InvalidApiKey or PermissionDenied otherwise."""
        credential = bearer_credential(authorization)
        if is_service_token(credential, self._service_token):
            return PLATFORM
        if self._keys is None:
            raise InvalidApiKey(
                "this network checks no API keys: its node admin API accepts only the "
                "platform's service token"
            )
        account_id, scopes = await self._keys.scopes_of(credential)
        if ADMIN_SCOPE in scopes:
            return PLATFORM
        if MANAGEMENT_SCOPE in scopes:
            return NodeViewer(account_id)
        raise PermissionDenied("This API key has no management scope")


class _Guarded(Protocol):
    callers: ServiceCallers


_F = TypeVar("_F", bound=Callable[..., Any])


def service_only(method: _F) -> _F:
    """Checks the caller of a servicer method (unary or server-streaming) against the
    servicer's ``callers`` first; put it under ``@translate_errors``."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: _Guarded, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            self.callers.check(authorization(context))
            async for item in method(self, request, context):
                yield item

        return cast(_F, stream)

    @functools.wraps(method)
    async def unary(
        self: _Guarded, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        self.callers.check(authorization(context))
        return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)

    return cast(_F, unary)


def admin_only(method: _F) -> _F:
    """For a unary node admin method: the service token or an admin key; put it under
    ``@translate_errors``."""

    @functools.wraps(method)
    async def unary(
        self: _Guarded, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        (await self.callers.viewer(authorization(context))).require_admin()
        return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)

    return cast(_F, unary)
