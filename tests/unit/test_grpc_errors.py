"""A domain error that quotes a huge input still fits in gRPC's trailers."""

from __future__ import annotations

import pytest

from core.errors import DomainError, InvalidArgument, ModelNotFound
from core.grpc_errors import to_status

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
