"""The mapping from cloud's gRPC errors and bad input to HTTP + the OpenAI envelope."""

from __future__ import annotations

import json

import grpc
import pytest
from pydantic import ValidationError

from core.errors import (
    DomainError,
    ErrorReason,
    InsufficientQuota,
    InvalidApiKey,
    InvalidArgument,
    JobFailed,
    ModelNotFound,
    NoCapacity,
    PermissionDenied,
)
from core.grpc_errors import to_status
from gateway import errors
from gateway.schemas import ChatCompletionRequest


def _rpc_error(error: DomainError) -> grpc.aio.AioRpcError:
    status = to_status(error)
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
        debug_error_string="",
    )


def _bare_rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="10.0.0.7:50051 refused",
        debug_error_string="",
    )


@pytest.mark.parametrize(
    ("error", "status", "type_", "param", "code"),
    [
        (InvalidApiKey("bad key"), 401, "invalid_request_error", None, "invalid_api_key"),
        (ModelNotFound("gpt-9"), 404, "invalid_request_error", "model", "model_not_found"),
        (
            PermissionDenied("not for inference"),
            403,
            "permission_denied",
            None,
            "permission_denied",
        ),
        (
            InvalidArgument("too long", field="messages"),
            400,
            "invalid_request_error",
            "messages",
            None,
        ),
        (InvalidArgument("bad"), 400, "invalid_request_error", None, None),
        (InsufficientQuota("no funds"), 429, "insufficient_quota", None, "insufficient_quota"),
        (NoCapacity("busy"), 503, "service_unavailable", None, "no_capacity"),
        (JobFailed("node lost"), 502, "server_error", None, None),
    ],
)
def test_domain_reasons(
    error: DomainError, status: int, type_: str, param: str | None, code: str | None
) -> None:
    api_error = errors.from_rpc_error(_rpc_error(error))

    assert (api_error.status, api_error.type, api_error.param, api_error.code) == (
        status,
        type_,
        param,
        code,
    )
    assert api_error.message == error.message


def test_insufficient_quota_tells_clients_not_to_retry() -> None:
    api_error = errors.from_rpc_error(_rpc_error(InsufficientQuota("no funds")))

    assert api_error.headers == {"x-should-retry": "false"}
    assert api_error.response().headers["x-should-retry"] == "false"


def test_busy_nodes_answer_503_with_retry_after() -> None:
    error = NoCapacity("nodes busy", metadata={"retry_after_s": "5"})

    api_error = errors.from_rpc_error(_rpc_error(error))

    assert (api_error.status, api_error.headers) == (503, {"retry-after": "5"})


def test_unlisted_reason_is_a_server_error_without_details() -> None:
    error = DomainError("db password wrong", reason=ErrorReason.INTERNAL)

    api_error = errors.from_rpc_error(_rpc_error(error))

    assert (api_error.status, api_error.type) == (500, "server_error")
    assert "password" not in api_error.message


@pytest.mark.parametrize(
    ("code", "status", "type_"),
    [
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 500, "server_error"),
        (grpc.StatusCode.UNKNOWN, 500, "server_error"),
    ],
)
def test_status_without_error_info(code: grpc.StatusCode, status: int, type_: str) -> None:
    api_error = errors.from_rpc_error(_bare_rpc_error(code))

    assert (api_error.status, api_error.type, api_error.code) == (status, type_, None)
    assert "10.0.0.7" not in api_error.message


def test_envelope_always_has_four_keys() -> None:
    response = errors.ApiError(418, "teapot", "invalid_request_error").response()

    assert response.status_code == 418
    assert response.headers["content-type"] == "application/json"
    assert json.loads(bytes(response.body)) == {
        "error": {"message": "teapot", "type": "invalid_request_error", "param": None, "code": None}
    }


_ABSENT = object()


def _validation_error(body: str) -> errors.ApiError:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate_json(body)
    return errors.from_validation_errors(caught.value.errors())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": _ABSENT}, "model"),
        ({"model": 7}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "a"}]},
            "messages.0.tool_call_id",
        ),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.name"),
        ({"messages": [{"role": "assistant"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "tool_calls": []}]}, "messages.0.tool_calls"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0.type",
        ),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
            "tools.0.function.name",
        ),
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice.type"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ],
)
def test_validation_error_names_the_field(body: dict[str, object], param: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    full = {key: value for key, value in full.items() if value is not _ABSENT}

    api_error = _validation_error(json.dumps(full))

    assert (api_error.status, api_error.type, api_error.param, api_error.code) == (
        400,
        "invalid_request_error",
        param,
        None,
    )
    assert param in api_error.message


def test_custom_validation_message_has_no_pydantic_prefix() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": ""}], "top_logprobs": 3}

    api_error = _validation_error(json.dumps(body))

    assert api_error.message == (
        "Invalid value for 'top_logprobs': top_logprobs requires logprobs to be true."
    )


@pytest.mark.parametrize("body", ["{not json", "", "[1, 2]", '"text"'])
def test_body_that_is_not_a_json_object(body: str) -> None:
    api_error = _validation_error(body)

    assert (api_error.status, api_error.param) == (400, None)


def test_unknown_url() -> None:
    api_error = errors.from_http_status(404, "GET", "/v1/nope")

    assert (api_error.status, api_error.code) == (404, "unknown_url")
    assert "/v1/nope" in api_error.message
