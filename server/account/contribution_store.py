"""PostgreSQL adapter of contribution records (RCP) and the settlement policy."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from server.account.ledger import Contribution, ContributionTotal, SettlementPolicy
from server.account.ledger_sql import Record, current_policy, policy_from_row


def _contribution(row: Record) -> Contribution:
    return Contribution(
        row["id"],
        row["operator_account_id"],
        row["hold_id"],
        row["node_id"],
        row["model"],
        row["tokens"],
        row["amount"],
        row["created_at"],
        row["epoch"],
    )


class PostgresContributionStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def policy(self) -> SettlementPolicy:
        async with self._pool.acquire() as conn:
            return await current_policy(conn)

    async def set_policy(self, policy: SettlementPolicy) -> SettlementPolicy:
        """Stores ``policy`` as the next version."""
        async with self._pool.acquire() as conn, conn.transaction():
            # Updates queue here, so each gets the next version number.
            await conn.execute("LOCK TABLE settlement_policies IN SHARE ROW EXCLUSIVE MODE")
            row = await conn.fetchrow(
                """INSERT INTO settlement_policies (version, operator_share_bps, platform_fee_bps,
                                                    epoch_seconds, min_payout, max_payout)
                   SELECT coalesce(max(version), 0) + 1, $1, $2, $3, $4, $5
                   FROM settlement_policies RETURNING *""",
                policy.operator_share_bps,
                policy.platform_fee_bps,
                policy.epoch_seconds,
                policy.min_payout,
                policy.max_payout,
            )
        assert row is not None
        return policy_from_row(row)

    async def list_contributions(
        self, operator_id: UUID, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Contribution]:
        rows = await self._pool.fetch(
            """SELECT * FROM contributions WHERE operator_account_id = $1
                 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
               ORDER BY created_at DESC, id DESC LIMIT $4""",
            operator_id,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_contribution(row) for row in rows]

    async def contribution_totals(
        self, operator_id: UUID, epochs: int
    ) -> tuple[ContributionTotal, list[ContributionTotal]]:
        async with self._pool.acquire() as conn:
            overall = await conn.fetchrow(
                """SELECT count(*) AS jobs, coalesce(sum(tokens), 0) AS tokens,
                          coalesce(sum(amount), 0) AS amount
                   FROM contributions WHERE operator_account_id = $1""",
                operator_id,
            )
            rows = await conn.fetch(
                """SELECT epoch, count(*) AS jobs, sum(tokens) AS tokens, sum(amount) AS amount
                   FROM contributions WHERE operator_account_id = $1
                   GROUP BY epoch ORDER BY epoch DESC LIMIT $2""",
                operator_id,
                epochs,
            )
        assert overall is not None
        return (
            ContributionTotal(-1, overall["jobs"], int(overall["tokens"]), int(overall["amount"])),
            [
                ContributionTotal(r["epoch"], r["jobs"], int(r["tokens"]), int(r["amount"]))
                for r in rows
            ],
        )
