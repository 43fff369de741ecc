"""The one place where domain errors become gRPC statuses and back.

A servicer method decorated with ``@translate_errors`` aborts with the status
code that matches the error's reason and a ``google.rpc.ErrorInfo`` detail; a
client runs its calls inside ``with domain_errors():``, which turns a failed call
back into the same ``DomainError`` (``domain_error_from_rpc``), so reasons survive
a chain of services. A batch call's failed item carries the same status
(``error_status``) and is read back the same way (``Failure.of_status``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import google.rpc.error_details_pb2 as error_details_pb2
import google.rpc.status_pb2 as status_pb2
import grpc
from google.protobuf import any_pb2
from grpc_status import rpc_status

from core.errors import DomainError, ErrorReason, quote, rebuild_error
from core.metadata import STATUS_DETAILS

ERROR_DOMAIN = "resultity"
# A status travels in trailers, which peers limit (8 KiB by default): an error that
# quotes a huge input must still arrive, so its message and metadata are bounded.
MAX_MESSAGE_LENGTH = 256
MAX_METADATA_VALUE_LENGTH = 128

STATUS_BY_REASON: dict[ErrorReason, grpc.StatusCode] = {
    ErrorReason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorReason.INVALID_API_KEY: grpc.StatusCode.UNAUTHENTICATED,
    ErrorReason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorReason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorReason.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorReason.INSUFFICIENT_QUOTA: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorReason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorReason.IDEMPOTENCY_KEY_REUSED: grpc.StatusCode.ALREADY_EXISTS,
    ErrorReason.HOLD_ALREADY_RESOLVED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.NO_CAPACITY: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.JOB_FAILED: grpc.StatusCode.ABORTED,
    ErrorReason.PROTOCOL_VIOLATION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.SESSION_ENDED: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.INVALID_NODE_CREDENTIALS: grpc.StatusCode.UNAUTHENTICATED,
    ErrorReason.INVALID_RESULT_SIGNATURE: grpc.StatusCode.PERMISSION_DENIED,
    ErrorReason.NODE_QUARANTINED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorReason.REPLICA_UNREACHABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorReason.INTERNAL: grpc.StatusCode.INTERNAL,
}
_REASON_BY_VALUE = {reason.value: reason for reason in ErrorReason}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {
    cast(int, code.value[0]): code for code in grpc.StatusCode
}


def error_status(error: DomainError) -> status_pb2.Status:
    """The google.rpc.Status of the error: its reason's code, and its reason and metadata
    as ErrorInfo; what a failed call carries, and a batch call's failed item."""
    code = STATUS_BY_REASON[error.reason]
    metadata = {
        quote(key, MAX_METADATA_VALUE_LENGTH): quote(value, MAX_METADATA_VALUE_LENGTH)
        for key, value in error.metadata.items()
    }
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value, domain=ERROR_DOMAIN, metadata=metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(
        code=cast(int, code.value[0]),
        message=quote(error.message, MAX_MESSAGE_LENGTH),
        details=[detail],
    )


def to_status(error: DomainError) -> grpc.Status:
    """A gRPC status carrying the error's reason and metadata as ErrorInfo."""
    return rpc_status.to_status(error_status(error))


async def abort_with_error(
    context: grpc.aio.ServicerContext[Any, Any], error: DomainError
) -> NoReturn:
    """Ends the RPC with the error's status and ErrorInfo."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # abort always raises


@dataclass(frozen=True)
class Failure:
    """A failed call as it crossed the wire: a failed RPC's status, or a batch call's
    failed item (a google.rpc.Status), read the same way."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None

    @classmethod
    def of_rpc(cls, error: grpc.aio.AioRpcError) -> Failure:
        return cls(error.code(), error.details() or "", error_info(error))

    @classmethod
    def of_status(cls, status: status_pb2.Status) -> Failure:
        return cls(
            _CODE_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN),
            status.message,
            _status_error_info(status),
        )

    def describe(self) -> str:
        """The failure in one line: status, message and the ErrorInfo reason if any."""
        reason = f" [{self.info.reason}]" if self.info is not None else ""
        return f"{self.code.name}: {self.message}{reason}"

    def domain_error(self) -> DomainError:
        """The DomainError the peer raised (its reason's subclass).

        A failure without ErrorInfo (transport failure, crash) becomes NO_CAPACITY
        when the peer was unreachable and INTERNAL otherwise.
        """
        info = self.info
        if info is not None and info.reason in _REASON_BY_VALUE:
            return rebuild_error(
                _REASON_BY_VALUE[info.reason], self.message or info.reason, info.metadata
            )
        if self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return rebuild_error(
                ErrorReason.NO_CAPACITY, f"upstream unavailable: {self.message}", {}
            )
        return rebuild_error(ErrorReason.INTERNAL, f"upstream error: {self.message}", {})


def rpc_error(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    """The error a call raises that ended with ``status`` (a job's end on a stream that
    carries many jobs): read back by ``domain_errors`` as the call's own would be."""
    return grpc.aio.AioRpcError(
        _CODE_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN),
        grpc.aio.Metadata(),
        grpc.aio.Metadata((STATUS_DETAILS, status.SerializeToString())),
        status.message,
        None,
    )


def describe_rpc_error(error: grpc.aio.AioRpcError) -> str:
    """A failed call in one line: status, message and the ErrorInfo reason if any."""
    return Failure.of_rpc(error).describe()


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if it has one."""
    if not isinstance(error, grpc.aio.AioRpcError):
        return None
    # aio metadata iterates as (key, value) pairs; the stubs type it loosely.
    trailing = cast("Iterable[tuple[str, str | bytes]]", error.trailing_metadata() or ())
    for key, value in trailing:
        if key == STATUS_DETAILS:
            return _status_error_info(status_pb2.Status.FromString(cast(bytes, value)))
    return None


def _status_error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def domain_error_from_rpc(error: grpc.aio.AioRpcError) -> DomainError:
    """Rebuilds the DomainError a downstream service raised (Failure.domain_error)."""
    return Failure.of_rpc(error).domain_error()


@contextlib.contextmanager
def domain_errors() -> Iterator[None]:
    """A gRPC call that fails inside this block raises the DomainError it carries.

    The one place a client turns a failed call into the domain's error; wrap the
    await of a unary call or the iteration of a stream.
    """
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise domain_error_from_rpc(error) from None


_F = TypeVar("_F", bound=Callable[..., Any])


def translate_errors(method: _F) -> _F:
    """Aborts the RPC with the mapped status when the method raises DomainError.

    Works for unary methods (coroutines) and server-streaming methods (async
    generators); the servicer's last positional argument is the context.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except DomainError as error:
                await abort_with_error(context, error)

        return cast(_F, stream_wrapper)

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except DomainError as error:
            await abort_with_error(context, error)

    return cast(_F, unary_wrapper)


__all__ = [
    "STATUS_BY_REASON",
    "Failure",
    "domain_error_from_rpc",
    "domain_errors",
    "error_info",
    "error_status",
    "rpc_error",
    "to_status",
    "translate_errors",
]
