"""PostgreSQL adapter for job records (state_ports.JobRecordStore)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from core.inference import JobOrigin, Usage
from server.network.job_records import Assignment, JobOutcome, JobRecord


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
        origin=JobOrigin(row["request_id"], row["account_id"], row["subcloud_id"]),
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


class PostgresJobRecordStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], network_id: str) -> None:
        self._pool = pool
        self._network_id = network_id

    async def save_jobs(self, records: Sequence[JobRecord]) -> None:
        await self._pool.executemany(
            """INSERT INTO network_jobs (network_id, job_id, request_id, account_id,
                   subcloud_id, model, assignments, prompt_tokens, completion_tokens,
                   created_at, first_token_at, finished_at, outcome, detail)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14)
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
            """SELECT job_id, request_id, account_id, subcloud_id, model,
                   assignments::text AS assignments, prompt_tokens, completion_tokens,
                   created_at, first_token_at, finished_at, outcome, detail
               FROM network_jobs WHERE network_id = $1 AND job_id = ANY($2::text[])""",
            self._network_id,
            list(job_ids),
        )
        return [_record_from_row(row) for row in rows]
