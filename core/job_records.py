"""A job's durable record, as the network writes it and its callers read it: whose
request it served and at which prices, the nodes and epochs it ran on, what was
relayed, when, and how it ended; and the filter records are listed by."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from core.errors import InvalidArgument
from core.inference import JobOrigin, Usage


class JobOutcome(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    # The caller went away (or cancelled) before the job ended.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Assignment:
    node_id: str
    epoch: int
    operator_account_id: str
    assigned_at: datetime


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    origin: JobOrigin
    model: str
    # In epoch order: the first node, then each one the job moved to.
    assignments: tuple[Assignment, ...]
    # Prompt tokens as billed, completion tokens as relayed to the caller.
    usage: Usage
    created_at: datetime
    first_token_at: datetime | None
    finished_at: datetime | None
    outcome: JobOutcome
    # The finish reason of a finished job; why a failed or cancelled one ended.
    detail: str = ""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Which records to list; every set field must hold."""

    account_id: str = ""
    model: str = ""
    # Any of these; empty: any outcome.
    outcomes: frozenset[JobOutcome] = frozenset()
    request_id: str = ""
    # Created at or after / before.
    created_after: datetime | None = None
    created_before: datetime | None = None


def validate_query(query: JobQuery) -> JobQuery:
    if (
        query.created_after is not None
        and query.created_before is not None
        and query.created_after >= query.created_before
    ):
        raise InvalidArgument("created_after must be before created_before", field="created_after")
    return query
