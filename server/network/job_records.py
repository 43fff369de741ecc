"""The journal of each job's durable record (core/job_records.py): whose request it
served, the nodes and epochs it ran on, what was relayed, when, and how it ended.

The journal builds records from the dispatch's events and hands them to a
writer (write_behind.py): at assignment, at each migration and at the end,
never per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from core.inference import JobOrigin, Usage
from core.job_records import Assignment, JobOutcome, JobRecord
from server.network.jobs import ActiveJob


@dataclass(slots=True)
class _Open:
    origin: JobOrigin
    created_at: datetime
    assignments: list[Assignment] = field(default_factory=list)
    first_token_at: datetime | None = None


class JobJournal:
    def __init__(
        self,
        record: Callable[[JobRecord], None],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``record`` stores a job's newest record (without waiting)."""
        self._record = record
        self._clock = clock
        self._open: dict[str, _Open] = {}

    def assigned(self, job: ActiveJob, origin: JobOrigin) -> None:
        """The job got its first node."""
        now = self._clock()
        entry = self._open[job.job_id] = _Open(origin, now)
        entry.assignments.append(_assignment(job, job.operator_account_id, now))
        self._record(self._build(job, entry, JobOutcome.RUNNING))

    def first_token(self, job: ActiveJob) -> None:
        entry = self._open.get(job.job_id)
        if entry is not None and entry.first_token_at is None:
            entry.first_token_at = self._clock()

    def migrated(self, job: ActiveJob, operator_account_id: str) -> None:
        """The job moved to its current node (of that operator) under a new epoch."""
        entry = self._open.get(job.job_id)
        if entry is not None:
            entry.assignments.append(_assignment(job, operator_account_id, self._clock()))
            self._record(self._build(job, entry, JobOutcome.RUNNING))

    def ended(self, job: ActiveJob, outcome: JobOutcome, detail: str) -> None:
        entry = self._open.pop(job.job_id, None)
        if entry is not None:
            self._record(self._build(job, entry, outcome, detail, self._clock()))

    @staticmethod
    def _build(
        job: ActiveJob,
        entry: _Open,
        outcome: JobOutcome,
        detail: str = "",
        finished_at: datetime | None = None,
    ) -> JobRecord:
        return JobRecord(
            job_id=job.job_id,
            origin=entry.origin,
            model=job.spec.model,
            assignments=tuple(entry.assignments),
            usage=Usage(job.prompt_tokens, job.delivered_tokens),
            created_at=entry.created_at,
            first_token_at=entry.first_token_at,
            finished_at=finished_at,
            outcome=outcome,
            detail=detail,
        )


def _assignment(job: ActiveJob, operator_account_id: str, at: datetime) -> Assignment:
    return Assignment(job.node_id, job.epoch, operator_account_id, at)
