"""Domain errors over gRPC: a status that fits in trailers, and on the client side the
DomainError the peer raised."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from core.errors import (
    DomainError,
    ErrorReason,
    InsufficientQuota,
    InvalidArgument,
    ModelNotFound,
    NoCapacity,
    RateLimited,
    rebuild_error,
)
from core.grpc_errors import domain_errors, to_status

# gRPC's default limit on the metadata a peer accepts.
TRAILER_LIMIT = 8 * 1024


@pytest.mark.parametrize(
    "error",
    [
        ModelNotFound("m" * 1_000_000),
        InvalidArgument("\U0001f600" * 100_000, field="f" * 100_000),
        DomainError("x", metadata={f"k{index}": "v" * 10_000 for index in range(8)}),
    ],
)
def test_status_of_a_huge_error_fits_in_trailers(error: DomainError) -> None:
    status = to_status(error)
    size = len(status.details.encode()) * 3 + sum(
        len(key) + len(value) for key, value in status.trailing_metadata
    )
    assert size < TRAILER_LIMIT


def test_a_short_message_is_kept_whole() -> None:
    assert to_status(ModelNotFound("gpt-9")).details == "The model 'gpt-9' does not exist"


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
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="peer gone", debug_error_string=""
    )


def _raised(rpc_error: grpc.aio.AioRpcError) -> DomainError:
    with pytest.raises(DomainError) as raised, domain_errors():
        raise rpc_error
    return raised.value


@pytest.mark.parametrize("reason", list(ErrorReason))
def test_every_reason_comes_back_as_its_own_error_class(reason: ErrorReason) -> None:
    error = _raised(_rpc_error(DomainError("refused", reason=reason)))
    assert error.reason is reason
    assert type(error).reason is reason
    assert error.message == "refused"
    if reason is not ErrorReason.INTERNAL:
        assert type(error) is not DomainError


def test_metadata_and_message_survive_the_wire() -> None:
    limited = _raised(
        _rpc_error(
            RateLimited(
                "slow down", retry_after_s=3, headers=(("x-ratelimit-limit-requests", "5"),)
            )
        )
    )
    assert isinstance(limited, RateLimited)
    assert limited.metadata == {"retry_after_s": "3", "x-ratelimit-limit-requests": "5"}
    invalid = _raised(_rpc_error(InvalidArgument("bad temperature", field="temperature")))
    assert isinstance(invalid, InvalidArgument)
    assert invalid.metadata == {"field": "temperature"}
    missing = _raised(_rpc_error(ModelNotFound("gpt-9")))
    assert isinstance(missing, ModelNotFound)
    assert (missing.message, missing.metadata) == (
        "The model 'gpt-9' does not exist",
        {"model": "gpt-9"},
    )


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_an_unreachable_peer_without_error_info_is_no_capacity(code: grpc.StatusCode) -> None:
    error = _raised(_bare_rpc_error(code))
    assert isinstance(error, NoCapacity)
    assert error.message == "upstream unavailable: peer gone"


def test_any_other_failure_without_error_info_is_internal() -> None:
    error = _raised(_bare_rpc_error(grpc.StatusCode.UNKNOWN))
    assert type(error) is DomainError
    assert error.reason is ErrorReason.INTERNAL


async def test_a_stream_that_fails_midway_raises_after_what_it_delivered() -> None:
    async def stream() -> AsyncIterator[int]:
        yield 1
        raise _rpc_error(InsufficientQuota("out of credits"))

    received = []

    async def consume() -> None:
        with domain_errors():
            async for item in stream():
                received.append(item)

    with pytest.raises(InsufficientQuota):
        await consume()
    assert received == [1]


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(ValueError, match="not an RPC"), domain_errors():
        raise ValueError("not an RPC")


def test_a_rebuilt_error_is_the_reason_class_with_the_peer_s_fields() -> None:
    error = rebuild_error(ErrorReason.RATE_LIMITED, "wait", {"retry_after_s": "1"})
    assert isinstance(error, RateLimited)
    assert (str(error), error.message, error.metadata) == ("wait", "wait", {"retry_after_s": "1"})
