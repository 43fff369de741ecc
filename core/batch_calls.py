"""Batch RPCs: one call that carries many items of a unary call.

Every gRPC call costs CPU on both sides (the event loop, the completion queue), so
a client that has many calls of one kind ready at once sends them as one call.
The servicer applies each item as the unary call would; an item's result is its
response or the google.rpc.Status the unary call would have failed with (code,
message, ErrorInfo), which the client turns back into the same error
(core.grpc_errors.Failure). A batch is bounded, so that neither side holds an
unbounded message or fans out without limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar, cast

import google.rpc.status_pb2 as status_pb2
import grpc
import structlog

from core.errors import DomainError, InvalidArgument, quote
from core.grpc_errors import MAX_MESSAGE_LENGTH, error_status

log = structlog.get_logger(__name__)

R = TypeVar("R")

MAX_ITEMS = 256
ITEMS_FIELD = "items"


def check_items(count: int) -> None:
    """Refuses a batch of more than MAX_ITEMS items."""
    if count > MAX_ITEMS:
        raise InvalidArgument(
            f"a batch carries at most {MAX_ITEMS} items, not {count}", field=ITEMS_FIELD
        )


async def item_outcomes(calls: Sequence[Awaitable[R]]) -> list[R | status_pb2.Status]:
    """Each call's result, or the status its unary RPC would have failed with
    (``failure_status``)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return [_outcome(outcome) for outcome in outcomes]


def failure_status(error: Exception) -> status_pb2.Status:
    """The status an RPC that raised ``error`` ends with: a DomainError's own status,
    anything else UNKNOWN (as gRPC answers a method that raised it)."""
    if isinstance(error, DomainError):
        return error_status(error)
    log.error("call failed", exc_info=error)
    return status_pb2.Status(
        code=cast(int, grpc.StatusCode.UNKNOWN.value[0]),
        # gRPC's own words for a method that raised it.
        message=quote(f"Unexpected {type(error)}: {error}", MAX_MESSAGE_LENGTH),
    )


def _outcome(outcome: R | BaseException) -> R | status_pb2.Status:
    if isinstance(outcome, Exception):
        return failure_status(outcome)
    if isinstance(outcome, BaseException):
        raise outcome  # cancelled: the call ends, as a unary one would
    return outcome
