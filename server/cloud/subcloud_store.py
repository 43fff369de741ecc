"""Subclouds in PostgreSQL (asyncpg)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

import asyncpg
from asyncpg import Record

from core.inference import ModelPrice, NodeRequirements
from server.cloud.subclouds import Subcloud, SubcloudMember, SubcloudModel, SubcloudRole
from server.common.inference_logging import InferenceLogging

if TYPE_CHECKING:
    Connection = asyncpg.pool.PoolConnectionProxy[Record]

_SUBCLOUD_COLUMNS = """s.subcloud_id, s.name, s.owner_account_id, s.created_at, s.archived_at,
    s.operator_account_ids, s.regions, s.min_reputation, s.verified_only,
    s.inference_logging, s.inference_log_retention_days,
    coalesce((SELECT array_agg((m.model, m.prompt_price, m.completion_price) ORDER BY m.model)
              FROM subcloud_models m WHERE m.subcloud_id = s.subcloud_id), '{}') AS models"""


def _model(row: Record) -> SubcloudModel:
    model, prompt, completion = row
    return SubcloudModel(model, None if prompt is None else ModelPrice(prompt, completion))


def _subcloud(row: Record) -> Subcloud:
    return Subcloud(
        subcloud_id=row["subcloud_id"],
        name=row["name"],
        owner_account_id=row["owner_account_id"],
        created=row["created_at"],
        rules=NodeRequirements(
            operator_account_ids=frozenset(row["operator_account_ids"]),
            regions=frozenset(row["regions"]),
            min_reputation=row["min_reputation"],
            verified_only=row["verified_only"],
        ),
        models=tuple(_model(offer) for offer in row["models"]),
        archived=row["archived_at"],
        inference_logging=InferenceLogging(
            row["inference_logging"], row["inference_log_retention_days"]
        ),
    )


def _member(row: Record) -> SubcloudMember:
    return SubcloudMember(row["account_id"], SubcloudRole(row["role"]), row["added_at"])


class PostgresSubcloudStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def insert(
        self,
        subcloud_id: UUID,
        name: str,
        owner_account_id: UUID,
        rules: NodeRequirements,
        models: tuple[SubcloudModel, ...],
        inference_logging: InferenceLogging,
    ) -> Subcloud:
        """The subcloud with its owner as first member, in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO subclouds (subcloud_id, name, owner_account_id,
                       operator_account_ids, regions, min_reputation, verified_only,
                       inference_logging, inference_log_retention_days)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
                subcloud_id,
                name,
                owner_account_id,
                sorted(rules.operator_account_ids),
                sorted(rules.regions),
                rules.min_reputation,
                rules.verified_only,
                inference_logging.enabled,
                inference_logging.retention_days,
            )
            await conn.execute(
                "INSERT INTO subcloud_members (subcloud_id, account_id, role) VALUES ($1, $2, $3)",
                subcloud_id,
                owner_account_id,
                SubcloudRole.OWNER.value,
            )
            await _replace_models(conn, subcloud_id, models)
            return await _get(conn, subcloud_id)

    async def get(self, subcloud_id: UUID) -> Subcloud | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_SUBCLOUD_COLUMNS} FROM subclouds s WHERE s.subcloud_id = $1",
                subcloud_id,
            )
        return None if row is None else _subcloud(row)

    async def member(self, subcloud_id: UUID, account_id: UUID) -> SubcloudMember | None:
        row = await self._pool.fetchrow(
            """SELECT account_id, role, added_at FROM subcloud_members
               WHERE subcloud_id = $1 AND account_id = $2""",
            subcloud_id,
            account_id,
        )
        return None if row is None else _member(row)

    async def page(
        self, member: UUID | None, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Subcloud]:
        """Newest first; only those ``member`` belongs to (None: all)."""
        after_time, after_id = after if after is not None else (None, None)
        rows = await self._pool.fetch(
            f"""SELECT {_SUBCLOUD_COLUMNS} FROM subclouds s
                WHERE ($1::uuid IS NULL OR EXISTS (
                          SELECT 1 FROM subcloud_members sm
                          WHERE sm.subcloud_id = s.subcloud_id AND sm.account_id = $1))
                  AND ($2::timestamptz IS NULL OR (s.created_at, s.subcloud_id) < ($2, $3))
                ORDER BY s.created_at DESC, s.subcloud_id DESC
                LIMIT $4""",
            member,
            after_time,
            after_id,
            limit,
        )
        return [_subcloud(row) for row in rows]

    async def update(
        self,
        subcloud_id: UUID,
        *,
        name: str | None = None,
        rules: NodeRequirements | None = None,
        models: tuple[SubcloudModel, ...] | None = None,
        inference_logging: InferenceLogging | None = None,
    ) -> Subcloud | None:
        """Replaces the given fields of an active subcloud; None if it is not active."""
        async with self._pool.acquire() as conn, conn.transaction():
            active = await conn.fetchval(
                """SELECT 1 FROM subclouds WHERE subcloud_id = $1 AND archived_at IS NULL
                   FOR UPDATE""",
                subcloud_id,
            )
            if not active:
                return None
            if name is not None:
                await conn.execute(
                    "UPDATE subclouds SET name = $2 WHERE subcloud_id = $1", subcloud_id, name
                )
            if rules is not None:
                await conn.execute(
                    """UPDATE subclouds SET operator_account_ids = $2, regions = $3,
                           min_reputation = $4, verified_only = $5
                       WHERE subcloud_id = $1""",
                    subcloud_id,
                    sorted(rules.operator_account_ids),
                    sorted(rules.regions),
                    rules.min_reputation,
                    rules.verified_only,
                )
            if models is not None:
                await _replace_models(conn, subcloud_id, models)
            if inference_logging is not None:
                await conn.execute(
                    """UPDATE subclouds SET inference_logging = $2,
                           inference_log_retention_days = $3
                       WHERE subcloud_id = $1""",
                    subcloud_id,
                    inference_logging.enabled,
                    inference_logging.retention_days,
                )
            return await _get(conn, subcloud_id)

    async def archive(self, subcloud_id: UUID) -> Subcloud | None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                """UPDATE subclouds SET archived_at = coalesce(archived_at, now())
                   WHERE subcloud_id = $1""",
                subcloud_id,
            )
            row = await conn.fetchrow(
                f"SELECT {_SUBCLOUD_COLUMNS} FROM subclouds s WHERE s.subcloud_id = $1",
                subcloud_id,
            )
        return None if row is None else _subcloud(row)

    async def put_member(
        self, subcloud_id: UUID, account_id: UUID, role: SubcloudRole
    ) -> SubcloudMember | None:
        """Adds the member or changes its role; None if it is the owner."""
        row = await self._pool.fetchrow(
            """INSERT INTO subcloud_members (subcloud_id, account_id, role)
               VALUES ($1, $2, $3)
               ON CONFLICT (subcloud_id, account_id) DO UPDATE SET role = excluded.role
                   WHERE subcloud_members.role <> 'owner'
               RETURNING account_id, role, added_at""",
            subcloud_id,
            account_id,
            role.value,
        )
        return None if row is None else _member(row)

    async def remove_member(self, subcloud_id: UUID, account_id: UUID) -> None:
        await self._pool.execute(
            """DELETE FROM subcloud_members
               WHERE subcloud_id = $1 AND account_id = $2 AND role <> 'owner'""",
            subcloud_id,
            account_id,
        )

    async def members(self, subcloud_id: UUID) -> list[SubcloudMember]:
        rows = await self._pool.fetch(
            """SELECT account_id, role, added_at FROM subcloud_members WHERE subcloud_id = $1
               ORDER BY role = 'owner' DESC, added_at, account_id""",
            subcloud_id,
        )
        return [_member(row) for row in rows]


async def _get(conn: Connection, subcloud_id: UUID) -> Subcloud:
    row = await conn.fetchrow(
        f"SELECT {_SUBCLOUD_COLUMNS} FROM subclouds s WHERE s.subcloud_id = $1", subcloud_id
    )
    assert row is not None  # read in the transaction that wrote it
    return _subcloud(row)


async def _replace_models(
    conn: Connection, subcloud_id: UUID, models: tuple[SubcloudModel, ...]
) -> None:
    await conn.execute("DELETE FROM subcloud_models WHERE subcloud_id = $1", subcloud_id)
    await conn.executemany(
        """INSERT INTO subcloud_models (subcloud_id, model, prompt_price, completion_price)
           VALUES ($1, $2, $3, $4)""",
        [
            (
                subcloud_id,
                offer.model,
                None if offer.price is None else offer.price.prompt,
                None if offer.price is None else offer.price.completion,
            )
            for offer in models
        ],
    )
