"""Batch calls: each item's outcome is its result or the status its unary call would
have failed with, read back as the same error; a batch is bounded."""

from __future__ import annotations

import asyncio

import google.rpc.status_pb2 as status_pb2
import grpc
import pytest

from core.batch_calls import MAX_ITEMS, check_items, item_outcomes
from core.errors import (
    DomainError,
    ErrorReason,
    IdempotencyKeyReused,
    InsufficientQuota,
    InvalidArgument,
    NotFound,
)
from core.grpc_errors import STATUS_BY_REASON, Failure, error_status, to_status


def _failure(outcome: object) -> Failure:
    assert isinstance(outcome, status_pb2.Status)
    return Failure.of_status(outcome)


async def _value(value: int) -> int:
    return value


async def _fail(error: Exception) -> int:
    raise error


def test_a_batch_of_the_bound_passes_and_one_more_is_refused_naming_the_field() -> None:
    check_items(0)
    check_items(MAX_ITEMS)
    with pytest.raises(InvalidArgument) as refused:
        check_items(MAX_ITEMS + 1)
    assert refused.value.metadata == {"field": "items"}


async def test_each_item_has_its_result_or_its_error_s_status_in_order() -> None:
    quota = InsufficientQuota("short by 5", metadata={"missing": "5"})
    outcomes = await item_outcomes(
        [_value(1), _fail(quota), _value(3), _fail(NotFound("no such hold"))]
    )
    assert outcomes[0] == 1
    assert outcomes[2] == 3
    assert outcomes[1] == error_status(quota)
    back = _failure(outcomes[1])
    assert back.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    error = back.domain_error()
    assert isinstance(error, InsufficientQuota)
    assert (error.message, error.metadata) == ("short by 5", {"missing": "5"})
    assert isinstance(_failure(outcomes[3]).domain_error(), NotFound)


async def test_an_unexpected_error_is_unknown_as_for_a_unary_method() -> None:
    [outcome] = await item_outcomes([_fail(ValueError("boom"))])
    failure = _failure(outcome)
    assert failure.code is grpc.StatusCode.UNKNOWN
    assert failure.info is None
    # gRPC's own words for a unary method that raised it.
    assert failure.message == "Unexpected <class 'ValueError'>: boom"
    error = failure.domain_error()
    assert type(error) is DomainError
    assert error.reason is ErrorReason.INTERNAL


async def test_a_cancelled_item_cancels_the_call() -> None:
    async def cancelled() -> int:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await item_outcomes([_value(1), cancelled()])


@pytest.mark.parametrize("reason", list(ErrorReason))
def test_an_item_s_status_is_the_unary_call_s_status(reason: ErrorReason) -> None:
    error = DomainError("refused", reason=reason, metadata={"k": "v"})
    status = error_status(error)
    unary = to_status(error)
    assert (status.code, status.message) == (unary.code.value[0], unary.details)
    failure = Failure.of_status(status)
    assert failure.code is STATUS_BY_REASON[reason]
    back = failure.domain_error()
    assert back.reason is reason
    assert back.metadata == {"k": "v"}
    assert failure.describe() == f"{STATUS_BY_REASON[reason].name}: refused [{reason.value}]"


def test_an_item_keeps_the_class_of_its_error() -> None:
    reused = Failure.of_status(error_status(IdempotencyKeyReused("key reused"))).domain_error()
    assert isinstance(reused, IdempotencyKeyReused)
