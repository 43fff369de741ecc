"""Domain errors shared by every service.

Domain code raises these; the transport layers map them in one place to a gRPC
status with google.rpc.ErrorInfo (server/common/grpc_errors.py) and from there
to HTTP and the OpenAI error envelope (gateway/errors.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

# What a message may quote of a caller's input: enough to recognise it, never so
# much that an error (or a log line) grows with the input.
QUOTE_LIMIT = 64


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """``value``, cut to ``limit`` characters with a marker when longer."""
    return value if len(value) <= limit else f"{value[:limit]}...({len(value)} chars)"


class ErrorReason(StrEnum):
    """Machine-readable reason, carried as ErrorInfo.reason across services."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    INVALID_API_KEY = "INVALID_API_KEY"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    INSUFFICIENT_QUOTA = "INSUFFICIENT_QUOTA"
    RATE_LIMITED = "RATE_LIMITED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    HOLD_ALREADY_RESOLVED = "HOLD_ALREADY_RESOLVED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NO_CAPACITY = "NO_CAPACITY"
    JOB_FAILED = "JOB_FAILED"
    PROTOCOL_VIOLATION = "PROTOCOL_VIOLATION"
    SESSION_ENDED = "SESSION_ENDED"
    INVALID_NODE_CREDENTIALS = "INVALID_NODE_CREDENTIALS"
    INVALID_RESULT_SIGNATURE = "INVALID_RESULT_SIGNATURE"
    NODE_QUARANTINED = "NODE_QUARANTINED"
    REPLICA_UNREACHABLE = "REPLICA_UNREACHABLE"
    INTERNAL = "INTERNAL"


class DomainError(Exception):
    """An expected failure with a reason the caller can act on."""

    reason: ErrorReason = ErrorReason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    reason = ErrorReason.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, metadata={"field": field} if field else None)


class InvalidApiKey(DomainError):
    reason = ErrorReason.INVALID_API_KEY


class PermissionDenied(DomainError):
    """The caller is known but may not do this (wrong scope, someone else's object)."""

    reason = ErrorReason.PERMISSION_DENIED


class FailedPrecondition(DomainError):
    """The request is valid but the object's state does not allow it."""

    reason = ErrorReason.FAILED_PRECONDITION


class NotFound(DomainError):
    reason = ErrorReason.NOT_FOUND


class ModelNotFound(DomainError):
    reason = ErrorReason.MODEL_NOT_FOUND

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{quote(model)}' does not exist", metadata={"model": quote(model)}
        )


class InsufficientQuota(DomainError):
    reason = ErrorReason.INSUFFICIENT_QUOTA


class RateLimited(DomainError):
    """Over a per-minute or concurrency limit; metadata says when to retry
    (``retry_after_s``) and the limits' state (x-ratelimit-* names)."""

    reason = ErrorReason.RATE_LIMITED

    def __init__(
        self, message: str, *, retry_after_s: int, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message, metadata={"retry_after_s": str(retry_after_s), **dict(headers)})


class IdempotencyKeyReused(DomainError):
    reason = ErrorReason.IDEMPOTENCY_KEY_REUSED


class HoldAlreadyResolved(DomainError):
    reason = ErrorReason.HOLD_ALREADY_RESOLVED


class NoCapacity(DomainError):
    reason = ErrorReason.NO_CAPACITY


class JobFailed(DomainError):
    reason = ErrorReason.JOB_FAILED


class ProtocolViolation(DomainError):
    reason = ErrorReason.PROTOCOL_VIOLATION


class SessionEnded(DomainError):
    """The server ended a node's session (timeout, shutdown); reconnect later."""

    reason = ErrorReason.SESSION_ENDED


class InvalidNodeCredentials(DomainError):
    """A node's hello is unsigned, badly signed, replayed, stale, or its token is invalid."""

    reason = ErrorReason.INVALID_NODE_CREDENTIALS


class NodeQuarantined(DomainError):
    """A quarantined node tried to join; it stays out until an operator releases it."""

    reason = ErrorReason.NODE_QUARANTINED


class InvalidResultSignature(DomainError):
    """A node's signed result does not match what it streamed: it is cut off."""

    reason = ErrorReason.INVALID_RESULT_SIGNATURE


class ReplicaUnreachable(DomainError):
    """The network replica holding a node's session cannot be reached to act on the
    node; the action may be tried again."""

    reason = ErrorReason.REPLICA_UNREACHABLE


_ERROR_BY_REASON: dict[ErrorReason, type[DomainError]] = {
    kind.reason: kind
    for kind in (
        InvalidArgument,
        InvalidApiKey,
        PermissionDenied,
        FailedPrecondition,
        NotFound,
        ModelNotFound,
        InsufficientQuota,
        RateLimited,
        IdempotencyKeyReused,
        HoldAlreadyResolved,
        NoCapacity,
        JobFailed,
        ProtocolViolation,
        SessionEnded,
        InvalidNodeCredentials,
        NodeQuarantined,
        InvalidResultSignature,
        ReplicaUnreachable,
    )
}


def rebuild_error(reason: ErrorReason, message: str, metadata: Mapping[str, str]) -> DomainError:
    """The error another service raised, from what crossed the wire: an instance of its
    reason's class (so callers can catch e.g. InsufficientQuota) with the same message and
    metadata. The class's own constructor is bypassed: its arguments are already folded
    into those."""
    kind = _ERROR_BY_REASON.get(reason, DomainError)
    error = kind.__new__(kind)
    DomainError.__init__(error, message, reason=reason, metadata=dict(metadata))
    return error
