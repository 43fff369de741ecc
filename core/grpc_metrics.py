"""Every gRPC server's calls counted by service, method and status code, and timed.

A server interceptor (``GrpcServerMetrics``), so that the account, network and
cloud services, alone or together under `resultity up`, report their calls the
same way. Services and methods are those the server registered (bounded); a call
of an unknown method is not counted. A streaming call's time is the stream's.
What stands for a call without being one (a job on a RunJobs stream: the RunJob
call it replaces) is counted as that call, in the same families (``GrpcCalls.call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from core.errors import DomainError
from core.grpc_errors import STATUS_BY_REASON
from core.metrics import LATENCY_BUCKETS, MetricsFactory

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class GrpcCalls:
    """The gRPC server's call counts and times, by service, method and status code
    (one set per metrics registry: every ``GrpcCalls`` of one counts into it)."""

    def __init__(self, metrics: MetricsFactory) -> None:
        self._handled = metrics.counter(
            "resultity_grpc_server_handled_total",
            "gRPC calls completed, by service, method and status code.",
            ("grpc_service", "grpc_method", "grpc_code"),
        )
        self._seconds = metrics.histogram(
            "resultity_grpc_server_handling_seconds",
            "Time from a gRPC call's start to its status (a stream's whole length).",
            ("grpc_service", "grpc_method"),
            LATENCY_BUCKETS,
        )

    def record(self, full_method: str, code: grpc.StatusCode, began: float) -> None:
        """A call of ``full_method`` ("/package.Service/Method") that began at
        ``began`` (monotonic) ended now with ``code``."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        self._handled.inc(service, method, code.name)
        self._seconds.observe(time.monotonic() - began, service, method)

    @contextlib.contextmanager
    def call(self, full_method: str) -> Iterator[None]:
        """Counts what runs inside as a call of ``full_method``: OK, or the status the
        call would end with after its error (CANCELLED when cancelled or closed)."""
        began = time.monotonic()
        try:
            yield
            code = grpc.StatusCode.OK
        except BaseException as error:
            code = _code_of(error)
            raise
        finally:
            self.record(full_method, code, began)


class GrpcServerMetrics(_ServerInterceptor):
    def __init__(self, metrics: MetricsFactory) -> None:
        self._calls = GrpcCalls(metrics)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behavior: Any, method: str) -> Any:
        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            began = time.monotonic()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as error:
                code = _code_of(error)
                raise
            finally:
                self._calls.record(method, code, began)

        return observed

    def _streaming(self, behavior: Any, method: str) -> Any:
        async def observed(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            began = time.monotonic()
            code = grpc.StatusCode.UNKNOWN
            try:
                async for response in behavior(request, context):
                    yield response
                code = context.code() or grpc.StatusCode.OK
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as error:
                code = _code_of(error)
                raise
            finally:
                self._calls.record(method, code, began)

        return observed


def _code_of(error: BaseException) -> grpc.StatusCode:
    """The status of a call its handler left with ``error`` (not an abort): a
    DomainError's own, as translate_errors would abort with it."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, DomainError):
        return STATUS_BY_REASON[error.reason]
    return grpc.StatusCode.UNKNOWN
