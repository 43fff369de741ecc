"""PostgreSQL adapter for inference logs (inference_logs.InferenceLogStore): one row
per logged request, its request and response as JSONB."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from server.cloud.inference_logs import InferenceLog, Json

# JSON's escape of U+0000 (not preceded by an escaping backslash), which jsonb refuses.
_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _jsonb(value: Json) -> str:
    """``value`` as JSON text jsonb accepts: U+0000 becomes U+FFFD, so that one odd
    prompt cannot fail its batch."""
    return _NUL.sub(r"\1\\ufffd", json.dumps(value))


def _entry(row: asyncpg.Record) -> InferenceLog:
    return InferenceLog(
        log_id=row["log_id"],
        request_id=row["request_id"],
        account_id=str(row["account_id"]),
        subcloud_id=row["subcloud_id"],
        job_ids=tuple(row["job_ids"]),
        model=row["model"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        request=json.loads(row["request"]),
        response=json.loads(row["response"]),
    )


class PostgresInferenceLogStore:
    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self._pool = pool

    async def add(self, entries: Sequence[InferenceLog]) -> None:
        # A log written twice (never expected: one per request) keeps the first.
        await self._pool.executemany(
            """INSERT INTO inference_logs (log_id, request_id, account_id, subcloud_id,
                   job_ids, model, created_at, expires_at, request, response)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb)
               ON CONFLICT (log_id) DO NOTHING""",
            [
                (
                    entry.log_id,
                    entry.request_id,
                    entry.account_id,
                    entry.subcloud_id,
                    list(entry.job_ids),
                    entry.model,
                    entry.created_at,
                    entry.expires_at,
                    _jsonb(entry.request),
                    _jsonb(entry.response),
                )
                for entry in entries
            ],
        )

    async def for_job(self, job_id: str) -> InferenceLog | None:
        row = await self._pool.fetchrow(
            """SELECT log_id, request_id, account_id, subcloud_id, job_ids, model, created_at,
                   expires_at, request::text AS request, response::text AS response
               FROM inference_logs WHERE job_ids @> ARRAY[$1::text] AND expires_at > now()""",
            job_id,
        )
        return None if row is None else _entry(row)

    async def delete_expired(self, now: datetime, limit: int) -> int:
        deleted = await self._pool.fetchval(
            """WITH expired AS (
                   SELECT log_id FROM inference_logs WHERE expires_at <= $1
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
               , gone AS (DELETE FROM inference_logs l USING expired e
                          WHERE l.log_id = e.log_id RETURNING 1)
               SELECT count(*) FROM gone""",
            now,
            limit,
        )
        return int(deleted)
