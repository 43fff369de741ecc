"""The one mapping from failures to HTTP statuses and the OpenAI error envelope.

Cloud reports domain errors as a gRPC status with google.rpc.ErrorInfo; the
reason decides the HTTP status, the OpenAI error type and code. Everything
else the gateway rejects (bad JSON, missing key, unknown URL) is built here too,
so every error body has the same four keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import BaseModel
from starlette.responses import Response

from core.errors import ErrorReason
from core.grpc_errors import error_info
from core.metadata import RATE_LIMIT_PREFIX
from gateway.schemas import ErrorBody, ErrorEnvelope

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable"
INSUFFICIENT_QUOTA = "insufficient_quota"
PERMISSION_DENIED = "permission_denied"
RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"

_GENERIC_SERVER_MESSAGE = "The server had an error while processing your request."
_UNAVAILABLE_MESSAGE = "The inference service is temporarily unavailable; retry later."


@dataclass
class ApiError(Exception):
    """An error response: raised anywhere in a route, rendered by the app's handler."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def envelope(self) -> ErrorEnvelope:
        return ErrorEnvelope(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> Response:
        return Response(
            content=self.envelope().model_dump_json(),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


@dataclass(frozen=True)
class _Mapped:
    status: int
    type: str
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


_BY_REASON: dict[str, _Mapped] = {
    ErrorReason.INVALID_API_KEY: _Mapped(401, INVALID_REQUEST, "invalid_api_key"),
    ErrorReason.MODEL_NOT_FOUND: _Mapped(404, INVALID_REQUEST, "model_not_found"),
    # An object the caller may not see, or that does not exist (a job).
    ErrorReason.NOT_FOUND: _Mapped(404, INVALID_REQUEST, "not_found"),
    # A valid key used outside its scopes or model allow-list.
    ErrorReason.PERMISSION_DENIED: _Mapped(403, PERMISSION_DENIED, PERMISSION_DENIED),
    ErrorReason.INVALID_ARGUMENT: _Mapped(400, INVALID_REQUEST),
    # Retrying cannot help until the caller tops up; the SDKs honour this header.
    ErrorReason.INSUFFICIENT_QUOTA: _Mapped(
        429, INSUFFICIENT_QUOTA, INSUFFICIENT_QUOTA, {"x-should-retry": "false"}
    ),
    # Retrying helps after retry-after (added from the error's metadata).
    ErrorReason.RATE_LIMITED: _Mapped(429, RATE_LIMIT_EXCEEDED, RATE_LIMIT_EXCEEDED),
    ErrorReason.NO_CAPACITY: _Mapped(503, SERVICE_UNAVAILABLE, "no_capacity"),
    # A node admin action could not reach the replica holding the node: try again.
    ErrorReason.REPLICA_UNREACHABLE: _Mapped(503, SERVICE_UNAVAILABLE, "replica_unreachable"),
    ErrorReason.JOB_FAILED: _Mapped(502, SERVER_ERROR),
}


@dataclass(frozen=True)
class RequestParams:
    """The OpenAI request a route serves, so that a field cloud names in an error
    becomes that request's param: renamed where the request calls it otherwise, and
    dropped where the request has no such field (cloud's own names, headers)."""

    fields: frozenset[str]
    renames: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: type[BaseModel], **renames: str) -> RequestParams:
        names = {info.alias or name for name, info in body.model_fields.items()}
        return cls(frozenset(names), renames)

    def param(self, cloud_field: str) -> str | None:
        """``cloud_field`` as the request names it; a rename applies to the longest
        dotted prefix it names ("messages" renames "messages.0.content")."""
        for prefix in sorted(self.renames, key=len, reverse=True):
            if cloud_field == prefix or cloud_field.startswith(f"{prefix}."):
                cloud_field = self.renames[prefix] + cloud_field[len(prefix) :]
                break
        return cloud_field if cloud_field.partition(".")[0] in self.fields else None


def rate_limit_headers(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The x-ratelimit-* entries of gRPC metadata (or ErrorInfo metadata), as headers."""
    return {
        key: value if isinstance(value, str) else value.decode()
        for key, value in metadata
        if key.startswith(RATE_LIMIT_PREFIX)
    }


def from_rpc_error(error: grpc.aio.AioRpcError, params: RequestParams | None = None) -> ApiError:
    """The HTTP error for a failed cloud call; ``params`` names fields as the
    route's request does."""
    info = error_info(error)
    mapped = _BY_REASON.get(info.reason) if info is not None else None
    if info is None or mapped is None:
        # No domain reason: a transport failure or a bug upstream, whose details are not
        # meant for API callers.
        if info is None and error.code() == grpc.StatusCode.UNAVAILABLE:
            return ApiError(503, _UNAVAILABLE_MESSAGE, SERVICE_UNAVAILABLE)
        return ApiError(500, _GENERIC_SERVER_MESSAGE, SERVER_ERROR)
    param: str | None = None
    if info.reason == ErrorReason.MODEL_NOT_FOUND:
        param = "model"
    elif info.reason == ErrorReason.INVALID_ARGUMENT:
        param = info.metadata.get("field") or None
        if param is not None and params is not None:
            param = params.param(param)
    headers = dict(mapped.headers)
    if info.reason == ErrorReason.RATE_LIMITED:
        headers.update(rate_limit_headers(info.metadata.items()))
    # Over a rate limit, or no node could start the job in time (NO_CAPACITY).
    retry_after = info.metadata.get("retry_after_s", "")
    if retry_after.isdigit():
        headers["retry-after"] = retry_after
    return ApiError(
        status=mapped.status,
        message=error.details() or info.reason,
        type=mapped.type,
        param=param,
        code=mapped.code,
        headers=headers,
    )


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 naming the first offending field, e.g. param "messages.0.role"."""
    if not errors:
        return ApiError(400, "Invalid request body.", INVALID_REQUEST)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return malformed_json()
    path = ".".join(str(part) for part in first.get("loc", ()))
    param = path or None
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{path}'."
    elif first.get("type") == "extra_forbidden":
        message = f"Unsupported parameter: '{path}' is not supported by this server."
    else:
        # Pydantic prefixes our own ValueErrors with "Value error, "; callers need the reason.
        ctx = first.get("ctx") or {}
        reason = str(ctx["error"]) if first.get("type") == "value_error" else first["msg"]
        message = f"Invalid value for '{path}': {reason}." if param else f"{reason}."
    return ApiError(400, message, INVALID_REQUEST, param=param)


def malformed_json() -> ApiError:
    return ApiError(
        400,
        "We could not parse the JSON body of your request. Send a JSON object.",
        INVALID_REQUEST,
    )


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than the limit of {limit} bytes.", INVALID_REQUEST
    )


def invalid_api_key() -> ApiError:
    return ApiError(401, "Incorrect API key provided.", INVALID_REQUEST, code="invalid_api_key")


def bad_header(message: str) -> ApiError:
    """A request header's value is refused; param names body fields only."""
    return ApiError(400, f"{message}.", INVALID_REQUEST)


def missing_api_key() -> ApiError:
    return ApiError(
        401,
        "You didn't provide an API key. Send it in the Authorization header "
        "as 'Authorization: Bearer YOUR_KEY'.",
        INVALID_REQUEST,
        code="invalid_api_key",
    )


def from_http_status(status: int, method: str, path: str) -> ApiError:
    """Errors the router itself raises: unknown URL, wrong method."""
    if status == 404:
        return ApiError(
            404, f"Unknown request URL: {method} {path}.", INVALID_REQUEST, code="unknown_url"
        )
    if status == 405:
        return ApiError(
            405, f"Method {method} is not allowed for {path}.", INVALID_REQUEST, code=None
        )
    error_type = SERVER_ERROR if status >= 500 else INVALID_REQUEST
    return ApiError(status, f"HTTP {status}.", error_type)


def internal_error() -> ApiError:
    return ApiError(500, _GENERIC_SERVER_MESSAGE, SERVER_ERROR)
