"""PostgreSQL adapter for job records (state_ports.JobRecordStore)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from core.inference import JobOrigin, ModelPrice, Usage
from core.job_records import Assignment, JobOutcome, JobQuery, JobRecord

_COLUMNS = """job_id, request_id, account_id, subcloud_id, prompt_price, completion_price,
    model, assignments::text AS assignments, prompt_tokens, completion_tokens, created_at,
    first_token_at, finished_at, outcome, detail"""


def _assignments_to_json(record: JobRecord) -> str:
    return json.dumps(
        [
            {
                "node_id": a.node_id,
                "epoch": a.epoch,
                "operator_account_id": a.operator_account_id,
                "assigned_at": a.assigned_at.isoformat(),
            }
            for a in record.assignments
        ]
    )


def _record_from_row(row: asyncpg.Record) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        origin=JobOrigin(
            row["request_id"],
            row["account_id"],
            row["subcloud_id"],
            ModelPrice(row["prompt_price"], row["completion_price"]),
        ),
        model=row["model"],
        assignments=tuple(
            Assignment(
                a["node_id"],
                a["epoch"],
                a["operator_account_id"],
                datetime.fromisoformat(a["assigned_at"]),
            )
            for a in json.loads(row["assignments"])
        ),
        usage=Usage(row["prompt_tokens"], row["completion_tokens"]),
        created_at=row["created_at"],
        first_token_at=row["first_token_at"],
        finished_at=row["finished_at"],
        outcome=JobOutcome(row["outcome"]),
        detail=row["detail"],
    )


def _conditions(query: JobQuery, after: tuple[datetime, str] | None) -> tuple[list[str], list[Any]]:
    """The WHERE clauses of ``query`` past ``after`` (parameters from $2 on; $1 is the
    network id), only those the query sets, so each listing gets a plan for its own
    filter."""
    clauses: list[str] = []
    values: list[Any] = []

    def where(clause: str, *arguments: Any) -> None:
        numbers = [f"${len(values) + 2 + i}" for i in range(len(arguments))]
        clauses.append(clause.format(*numbers))
        values.extend(arguments)

    if query.account_id:
        where("account_id = {}", query.account_id)
    if query.model:
        where("model = {}", query.model)
    if query.outcomes:
        where("outcome = ANY({}::text[])", sorted(outcome.value for outcome in query.outcomes))
    if query.request_id:
        where("request_id = {}", query.request_id)
    if query.created_after is not None:
        where("created_at >= {}", query.created_after)
    if query.created_before is not None:
        where("created_at < {}", query.created_before)
    if after is not None:
        where("(created_at, job_id) < ({}, {})", *after)
    return clauses, values


class PostgresJobRecordStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], network_id: str) -> None:
        self._pool = pool
        self._network_id = network_id

    async def save_jobs(self, records: Sequence[JobRecord]) -> None:
        await self._pool.executemany(
            """INSERT INTO network_jobs (network_id, job_id, request_id, account_id,
                   subcloud_id, prompt_price, completion_price, model, assignments,
                   prompt_tokens, completion_tokens, created_at, first_token_at, finished_at,
                   outcome, detail)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14,
                       $15, $16)
               ON CONFLICT (network_id, job_id) DO UPDATE SET
                   assignments = excluded.assignments,
                   prompt_tokens = excluded.prompt_tokens,
                   completion_tokens = excluded.completion_tokens,
                   first_token_at = excluded.first_token_at,
                   finished_at = excluded.finished_at,
                   outcome = excluded.outcome,
                   detail = excluded.detail""",
            [
                (
                    self._network_id,
                    r.job_id,
                    r.origin.request_id,
                    r.origin.account_id,
                    r.origin.subcloud_id,
                    r.origin.price.prompt,
                    r.origin.price.completion,
                    r.model,
                    _assignments_to_json(r),
                    r.usage.prompt_tokens,
                    r.usage.completion_tokens,
                    r.created_at,
                    r.first_token_at,
                    r.finished_at,
                    r.outcome.value,
                    r.detail,
                )
                for r in records
            ],
        )

    async def load_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        rows = await self._pool.fetch(
            f"""SELECT {_COLUMNS}
               FROM network_jobs WHERE network_id = $1 AND job_id = ANY($2::text[])""",
            self._network_id,
            list(job_ids),
        )
        return [_record_from_row(row) for row in rows]

    async def list_jobs(
        self, query: JobQuery, limit: int, after: tuple[datetime, str] | None
    ) -> list[JobRecord]:
        clauses, values = _conditions(query, after)
        where = "".join(f" AND {clause}" for clause in clauses)
        rows = await self._pool.fetch(
            f"""SELECT {_COLUMNS} FROM network_jobs WHERE network_id = $1{where}
                ORDER BY created_at DESC, job_id DESC LIMIT {int(limit)}""",
            self._network_id,
            *values,
        )
        return [_record_from_row(row) for row in rows]
