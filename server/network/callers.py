"""Who may call the network's dispatch and node admin APIs: the platform itself.

Running jobs and listing, draining or quarantining nodes is for the
platform's own services and operators: callers present the platform's
service token (the one the account layer accepts) as
``authorization: Bearer <token>``. Anything else fails with UNAUTHENTICATED
and ErrorInfo reason INVALID_API_KEY before the method runs. Agents do not
come through here: their stream is authenticated by its signed hello and
node token (admission.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import grpc

from core.errors import InvalidApiKey
from server.common.credentials import bearer_credential, is_service_token
from server.common.transport import authorization


class ServiceCallers:
    def __init__(self, service_token: str) -> None:
        if not service_token:
            raise ValueError("the network needs the platform's service token")
        self._service_token = service_token

    def check(self, authorization: str | None) -> None:
        """Passes for the service token; raises InvalidApiKey otherwise."""
        if not is_service_token(bearer_credential(authorization), self._service_token):
            raise InvalidApiKey(
                "the network's dispatch and node admin APIs accept only the platform's "
                "service token"
            )


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
