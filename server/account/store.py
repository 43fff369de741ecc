"""PostgreSQL adapter of the account server: the only module with SQL.

Ledger invariants are kept by the SQL itself: every transfer moves the same
amount between the running totals of two ledger accounts in one
transaction, so the sums over all accounts stay zero. Lock order, to keep
concurrent transactions free of deadlocks: transfer rows first, then user
ledger accounts (by id), then system ledger accounts.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import asyncpg

from server.account.api_keys import ApiKey, GeneratedKey
from server.account.ledger import (
    Balance,
    Hold,
    HoldStatus,
    TopUpResult,
    ensure_same_request,
    resolve_hold,
)
from server.account.service import Account
from server.common.errors import InsufficientQuota, InvalidArgument, NotFound

# Fixed ids of the system ledger accounts; created by migration 0001.
CASH_IN_ID = UUID("00000000-0000-4000-8000-000000000001")
PLATFORM_REVENUE_ID = UUID("00000000-0000-4000-8000-000000000002")
_SYSTEM_IDS = frozenset({CASH_IN_ID, PLATFORM_REVENUE_ID})

Record = asyncpg.Record
if TYPE_CHECKING:  # the proxy is generic only in the type stubs
    Connection = asyncpg.pool.PoolConnectionProxy[Record]

_HOLD_COLUMNS = """t.id, la.owner_id, t.amount, t.captured, t.status, t.expires_at,
                   t.request_fingerprint"""
_HOLD_FROM = "transfers t JOIN ledger_accounts la ON la.id = t.debit_account_id"


def _account(row: Record) -> Account:
    return Account(row["id"], row["name"], row["created_at"], row["disabled"])


def _api_key(row: Record) -> ApiKey:
    return ApiKey(row["id"], row["account_id"], row["name"], row["prefix"], row["created_at"])


def _hold(row: Record) -> Hold:
    return Hold(
        hold_id=row["id"],
        account_id=row["owner_id"],
        amount=row["amount"],
        captured=row["captured"],
        status=HoldStatus(row["status"]),
        expires_at=row["expires_at"],
    )


def _balance(owner_id: UUID, row: Record) -> Balance:
    return Balance(
        account_id=owner_id,
        available=row["credits_posted"] - row["debits_posted"] - row["debits_pending"],
        held=row["debits_pending"],
    )


class PostgresAccountStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    # accounts and keys

    async def insert_account(self, name: str) -> Account:
        account_id = uuid4()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO accounts (id, name) VALUES ($1, $2) RETURNING *", account_id, name
            )
            await conn.execute(
                "INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits)"
                " VALUES ($1, $2, 'consumer', true)",
                uuid4(),
                account_id,
            )
        assert row is not None
        return _account(row)

    async def get_account(self, account_id: UUID) -> Account | None:
        row = await self._pool.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
        return None if row is None else _account(row)

    async def insert_api_key(self, account_id: UUID, name: str, key: GeneratedKey) -> ApiKey | None:
        row = await self._pool.fetchrow(
            """INSERT INTO api_keys (id, account_id, name, prefix, key_hash)
               SELECT $1, id, $3, $4, $5 FROM accounts WHERE id = $2 AND NOT disabled
               RETURNING *""",
            uuid4(),
            account_id,
            name,
            key.prefix,
            key.key_hash,
        )
        return None if row is None else _api_key(row)

    async def find_active_api_key(self, key_hash: str) -> ApiKey | None:
        row = await self._pool.fetchrow(
            """SELECT k.* FROM api_keys k JOIN accounts a ON a.id = k.account_id
               WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND NOT a.disabled""",
            key_hash,
        )
        return None if row is None else _api_key(row)

    async def revoke_api_key(self, api_key_id: UUID) -> bool:
        found = await self._pool.fetchval(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
               WHERE id = $1 RETURNING id""",
            api_key_id,
        )
        return found is not None

    # ledger

    async def get_balance(self, account_id: UUID) -> Balance | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM ledger_accounts WHERE owner_id = $1 AND kind = 'consumer'", account_id
        )
        return None if row is None else _balance(account_id, row)

    async def top_up(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult:
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await _consumer_id(conn, account_id)
            # Inserting first makes concurrent calls with one key queue on the
            # unique index: the first one does the work, the others replay it.
            transfer_id = await conn.fetchval(
                """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind,
                                          status, idempotency_key, request_fingerprint)
                   VALUES ($1, $2, $3, $4, 'top_up', 'posted', $5, $6)
                   ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
                uuid4(),
                CASH_IN_ID,
                consumer,
                amount,
                idempotency_key,
                fingerprint,
            )
            if transfer_id is None:
                existing = await _by_idempotency_key(conn, idempotency_key)
                ensure_same_request(existing["request_fingerprint"], fingerprint)
                row = await conn.fetchrow("SELECT * FROM ledger_accounts WHERE id = $1", consumer)
                assert row is not None
                return TopUpResult(existing["id"], _balance(account_id, row))
            try:
                row = await conn.fetchrow(
                    """UPDATE ledger_accounts SET credits_posted = credits_posted + $2
                       WHERE id = $1 RETURNING *""",
                    consumer,
                    amount,
                )
                await conn.execute(
                    "UPDATE ledger_accounts SET debits_posted = debits_posted + $2 WHERE id = $1",
                    CASH_IN_ID,
                    amount,
                )
            except asyncpg.NumericValueOutOfRangeError:
                raise InvalidArgument(
                    "The balance would exceed the largest amount the ledger holds",
                    field="amount_micro_credits",
                ) from None
            assert row is not None
            return TopUpResult(transfer_id, _balance(account_id, row))

    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold:
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await _consumer_id(conn, account_id)
            row = await conn.fetchrow(
                """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind,
                                          status, idempotency_key, request_fingerprint,
                                          expires_at)
                   VALUES ($1, $2, $3, $4, 'hold', 'pending', $5, $6, $7)
                   ON CONFLICT (idempotency_key) DO NOTHING
                   RETURNING id, $8::uuid AS owner_id, amount, captured, status, expires_at""",
                uuid4(),
                consumer,
                PLATFORM_REVENUE_ID,
                amount,
                idempotency_key,
                fingerprint,
                expires_at,
                account_id,
            )
            if row is None:
                existing = await _by_idempotency_key(conn, idempotency_key)
                ensure_same_request(existing["request_fingerprint"], fingerprint)
                return _hold(existing)
            # Check and reserve in one statement: a concurrent hold on the same
            # account waits for the row and then re-evaluates the condition.
            reserved = await conn.fetchval(
                """UPDATE ledger_accounts SET debits_pending = debits_pending + $2
                   WHERE id = $1 AND credits_posted - debits_posted - debits_pending >= $2
                   RETURNING id""",
                consumer,
                amount,
            )
            if reserved is None:
                raise InsufficientQuota(
                    f"Not enough available credits for a hold of {amount} micro-credits"
                )
            await conn.execute(
                "UPDATE ledger_accounts SET credits_pending = credits_pending + $2 WHERE id = $1",
                PLATFORM_REVENUE_ID,
                amount,
            )
            return _hold(row)

    async def settle_hold(self, hold_id: UUID, capture: int) -> Hold:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""SELECT {_HOLD_COLUMNS}, t.debit_account_id, t.credit_account_id
                    FROM {_HOLD_FROM} WHERE t.id = $1 AND t.kind = 'hold' FOR UPDATE OF t""",
                hold_id,
            )
            if row is None:
                raise NotFound(f"Hold {hold_id} not found")
            hold = _hold(row)
            status = resolve_hold(hold, capture)
            if status is None:
                return hold
            await conn.execute(
                """UPDATE transfers SET status = $2, captured = $3, resolved_at = now()
                   WHERE id = $1""",
                hold_id,
                status.value,
                capture,
            )
            # Pending totals drop by the whole hold; posted totals rise by the capture.
            await conn.execute(
                """UPDATE ledger_accounts SET debits_pending = debits_pending - $2,
                                              debits_posted = debits_posted + $3
                   WHERE id = $1""",
                row["debit_account_id"],
                hold.amount,
                capture,
            )
            await conn.execute(
                """UPDATE ledger_accounts SET credits_pending = credits_pending - $2,
                                              credits_posted = credits_posted + $3
                   WHERE id = $1""",
                row["credit_account_id"],
                hold.amount,
                capture,
            )
            if capture:
                await conn.execute(
                    """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount,
                                              kind, status, pending_id)
                       VALUES ($1, $2, $3, $4, 'capture', 'posted', $5)""",
                    uuid4(),
                    row["debit_account_id"],
                    row["credit_account_id"],
                    capture,
                    hold_id,
                )
        return Hold(hold.hold_id, hold.account_id, hold.amount, capture, status, hold.expires_at)

    async def release_expired_holds(self, limit: int) -> int:
        """Releases up to ``limit`` expired holds in one transaction.

        SKIP LOCKED lets several sweepers (replicas) work side by side and
        leaves alone holds being settled right now; the status condition,
        re-checked under the row lock, resolves each hold at most once.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """WITH expired AS (
                       SELECT id FROM transfers
                       WHERE kind = 'hold' AND status = 'pending' AND expires_at < now()
                       ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                   UPDATE transfers t SET status = 'released', resolved_at = now()
                   FROM expired WHERE t.id = expired.id
                   RETURNING t.debit_account_id, t.credit_account_id, t.amount""",
                limit,
            )
            debits: defaultdict[UUID, int] = defaultdict(int)
            credits: defaultdict[UUID, int] = defaultdict(int)
            for row in rows:
                debits[row["debit_account_id"]] += row["amount"]
                credits[row["credit_account_id"]] += row["amount"]
            changes = [
                (account, debits.get(account, 0), credits.get(account, 0))
                for account in sorted(debits.keys() | credits.keys(), key=_lock_order)
            ]
            # executemany runs the updates one by one, in this (lock) order.
            await conn.executemany(
                """UPDATE ledger_accounts SET debits_pending = debits_pending - $2,
                                              credits_pending = credits_pending - $3
                   WHERE id = $1""",
                changes,
            )
        return len(rows)


def _lock_order(ledger_account_id: UUID) -> tuple[bool, UUID]:
    return (ledger_account_id in _SYSTEM_IDS, ledger_account_id)


async def _consumer_id(conn: Connection, account_id: UUID) -> UUID:
    consumer: UUID | None = await conn.fetchval(
        "SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = 'consumer'", account_id
    )
    if consumer is None:
        raise NotFound(f"Account {account_id} not found")
    return consumer


async def _by_idempotency_key(conn: Connection, idempotency_key: str) -> Record:
    row = await conn.fetchrow(
        f"SELECT {_HOLD_COLUMNS} FROM {_HOLD_FROM} WHERE t.idempotency_key = $1",
        idempotency_key,
    )
    assert row is not None  # the conflicting row is committed, or we would not get here
    return row
