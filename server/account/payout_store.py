"""PostgreSQL adapter of payouts: a reservation on the operator's earnings
(a pending 'payout' transfer to cash-out), captured or released by an admin."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from core.errors import InsufficientQuota, NotFound
from server.account.ledger import SettlementPolicy, ensure_same_request
from server.account.ledger_sql import (
    AVAILABLE,
    CASH_OUT,
    Connection,
    Delta,
    Record,
    apply_deltas,
    current_policy,
    ledger_account_id,
)
from server.account.payouts import Payout, PayoutStatus, resolution

_PAYOUT_COLUMNS = """p.id, p.account_id, p.amount, p.status, p.note, p.requested_at,
                     p.resolved_at, p.request_fingerprint, p.transfer_id"""


def _payout(row: Record) -> Payout:
    return Payout(
        payout_id=row["id"],
        account_id=row["account_id"],
        amount=row["amount"],
        status=PayoutStatus(row["status"]),
        note=row["note"],
        requested_at=row["requested_at"],
        resolved_at=row["resolved_at"],
    )


class PostgresPayoutStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    async def policy(self) -> SettlementPolicy:
        async with self._pool.acquire() as conn:
            return await current_policy(conn)

    async def request(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> Payout:
        cash_out = CASH_OUT.any_shard()
        async with self._pool.acquire() as conn, conn.transaction():
            earnings = await ledger_account_id(conn, account_id, "operator")
            # Inserting first makes concurrent calls with one key queue on the
            # unique index: the first one reserves, the others replay it.
            transfer_id = await conn.fetchval(
                """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind,
                                          status, idempotency_key, request_fingerprint)
                   VALUES ($1, $2, $3, $4, 'payout', 'pending', $5, $6)
                   ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
                uuid4(),
                earnings,
                cash_out,
                amount,
                idempotency_key,
                fingerprint,
            )
            if transfer_id is None:
                row = await conn.fetchrow(
                    f"SELECT {_PAYOUT_COLUMNS} FROM payouts p WHERE p.idempotency_key = $1",
                    idempotency_key,
                )
                assert row is not None  # committed with its transfer
                ensure_same_request(row["request_fingerprint"], fingerprint)
                return _payout(row)
            # Check and reserve in one statement, as a hold does.
            reserved = await conn.fetchval(
                f"""UPDATE ledger_accounts SET debits_pending = debits_pending + $2
                    WHERE id = $1 AND {AVAILABLE} >= $2 RETURNING id""",
                earnings,
                amount,
            )
            if reserved is None:
                raise InsufficientQuota(f"Not enough earnings to pay out {amount} micro-credits")
            await conn.execute(
                "UPDATE ledger_accounts SET credits_pending = credits_pending + $2 WHERE id = $1",
                cash_out,
                amount,
            )
            row = await conn.fetchrow(
                """INSERT INTO payouts (id, account_id, amount, status, transfer_id,
                                        idempotency_key, request_fingerprint)
                   VALUES ($1, $2, $3, 'requested', $4, $5, $6) RETURNING *""",
                uuid4(),
                account_id,
                amount,
                transfer_id,
                idempotency_key,
                fingerprint,
            )
            assert row is not None
            return _payout(row)

    async def resolve(self, payout_id: UUID, outcome: PayoutStatus, note: str) -> Payout:
        """Captures (completed) or releases (rejected) the payout's reservation."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""SELECT {_PAYOUT_COLUMNS}, t.debit_account_id, t.credit_account_id
                    FROM payouts p
                    JOIN transfers t ON t.id = p.transfer_id
                    WHERE p.id = $1 FOR UPDATE OF p, t""",
                payout_id,
            )
            if row is None:
                raise NotFound(f"Payout {payout_id} not found")
            payout = _payout(row)
            if not resolution(payout, outcome, note):
                return payout
            await _settle_reservation(conn, row, outcome is PayoutStatus.COMPLETED)
            resolved = await conn.fetchrow(
                """UPDATE payouts SET status = $2, note = $3, resolved_at = now()
                   WHERE id = $1 RETURNING *""",
                payout_id,
                outcome.value,
                note,
            )
            assert resolved is not None
            return _payout(resolved)

    async def list_payouts(
        self, account_id: UUID | None, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Payout]:
        rows = await self._pool.fetch(
            """SELECT * FROM payouts
               WHERE ($1::uuid IS NULL OR account_id = $1)
                 AND ($2::timestamptz IS NULL OR (requested_at, id) < ($2, $3))
               ORDER BY requested_at DESC, id DESC LIMIT $4""",
            account_id,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_payout(row) for row in rows]


async def _settle_reservation(conn: Connection, row: Record, paid: bool) -> None:
    """Ends the reservation: the amount leaves through cash-out, or returns to earnings."""
    amount, earnings, transfer_id = row["amount"], row["debit_account_id"], row["transfer_id"]
    cash_out = row["credit_account_id"]  # the shard the reservation credited
    await conn.execute(
        """UPDATE transfers SET status = $2, captured = $3, resolved_at = now()
           WHERE id = $1""",
        transfer_id,
        "settled" if paid else "released",
        amount if paid else 0,
    )
    deltas: dict[UUID, Delta] = defaultdict(Delta)
    deltas[earnings].debits_pending -= amount
    deltas[cash_out].credits_pending -= amount
    if paid:
        deltas[earnings].debits_posted += amount
        deltas[cash_out].credits_posted += amount
        await conn.execute(
            """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind,
                                      status, pending_id)
               VALUES ($1, $2, $3, $4, 'capture', 'posted', $5)""",
            uuid4(),
            earnings,
            cash_out,
            amount,
            transfer_id,
        )
    await apply_deltas(conn, deltas)
