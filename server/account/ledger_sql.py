"""Shared SQL of the credit ledger: system accounts, running totals, posted transfers.

Ledger invariants are kept by the SQL itself: every transfer moves the same
amount between the running totals of two ledger accounts in one
transaction, so the sums over all accounts stay equal; accounts that may not
go negative carry a CHECK constraint as the last line of defence. Lock
order, to keep concurrent transactions free of deadlocks: transfer rows
first, then account rows, then user ledger accounts (by id), then system
ledger accounts (by id).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import asyncpg

from core.errors import InsufficientQuota, InvalidArgument, NotFound
from server.account.ledger import (
    Balance,
    SettlementPolicy,
    TransferKind,
    ensure_same_request,
)

# Rows (shards) of each sharded system account; migration 0008 creates them.
SHARDS = 16


@dataclass(frozen=True)
class SystemAccount:
    """A system ledger account kept in SHARDS rows, so that concurrent transfers
    lock different rows; a transfer names any one shard, reads sum them all."""

    kind: str
    shards: tuple[UUID, ...]

    @classmethod
    def sharded(cls, kind: str, first: UUID) -> SystemAccount:
        # Shard s adds s to the UUID's clock-sequence field: ...-8000-... is shard 0.
        return cls(kind, tuple(UUID(int=first.int + (s << 48)) for s in range(SHARDS)))

    def any_shard(self) -> UUID:
        """A shard picked at random: concurrent transactions rarely pick the same."""
        return random.choice(self.shards)


# Fixed ids of the system ledger accounts; created by migrations 0001, 0002, 0004
# and 0008 (the shards).
CASH_IN = SystemAccount.sharded("cash_in", UUID("00000000-0000-4000-8000-000000000001"))
PLATFORM_REVENUE = SystemAccount.sharded(
    "platform_revenue", UUID("00000000-0000-4000-8000-000000000002")
)
PROMO_POOL_ID = UUID("00000000-0000-4000-8000-000000000003")
CASH_OUT = SystemAccount.sharded("cash_out", UUID("00000000-0000-4000-8000-000000000004"))
SYSTEM_IDS = frozenset({*CASH_IN.shards, *PLATFORM_REVENUE.shards, *CASH_OUT.shards, PROMO_POOL_ID})

Record = asyncpg.Record
if TYPE_CHECKING:  # the proxy is generic only in the type stubs
    Connection = asyncpg.pool.PoolConnectionProxy[Record]
else:
    Connection = asyncpg.pool.PoolConnectionProxy

AVAILABLE = "credits_posted - debits_posted - debits_pending"


@dataclass(slots=True)
class Delta:
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0


def _lock_order(ledger_account_id: UUID) -> tuple[bool, UUID]:
    return (ledger_account_id in SYSTEM_IDS, ledger_account_id)


async def apply_deltas(conn: Connection, deltas: Mapping[UUID, Delta]) -> None:
    """Adds the deltas to the running totals, one account at a time in lock order.

    An account that may not go negative fails its CHECK constraint
    (asyncpg.CheckViolationError), which aborts the transaction.
    """
    await conn.executemany(
        """UPDATE ledger_accounts SET debits_pending = debits_pending + $2,
                                      debits_posted = debits_posted + $3,
                                      credits_pending = credits_pending + $4,
                                      credits_posted = credits_posted + $5
           WHERE id = $1""",
        [
            (
                account,
                deltas[account].debits_pending,
                deltas[account].debits_posted,
                deltas[account].credits_pending,
                deltas[account].credits_posted,
            )
            for account in sorted(deltas, key=_lock_order)
        ],
    )


async def insert_posted(
    conn: Connection,
    debit: UUID,
    credit: UUID,
    amount: int,
    kind: TransferKind,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> UUID | None:
    """The new transfer's id; None when the idempotency key was used before."""
    transfer_id: UUID | None = await conn.fetchval(
        """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind,
                                  status, idempotency_key, request_fingerprint)
           VALUES ($1, $2, $3, $4, $5, 'posted', $6, $7)
           ON CONFLICT (idempotency_key) DO NOTHING RETURNING id""",
        uuid4(),
        debit,
        credit,
        amount,
        kind.value,
        idempotency_key,
        fingerprint,
    )
    return transfer_id


async def replay(conn: Connection, idempotency_key: str, fingerprint: str) -> UUID:
    row = await conn.fetchrow(
        "SELECT id, request_fingerprint FROM transfers WHERE idempotency_key = $1",
        idempotency_key,
    )
    assert row is not None  # the conflicting row is committed, or we would not get here
    ensure_same_request(row["request_fingerprint"], fingerprint)
    transfer_id: UUID = row["id"]
    return transfer_id


async def post(
    conn: Connection,
    debit: UUID,
    credit: UUID,
    amount: int,
    kind: TransferKind,
    idempotency_key: str,
    fingerprint: str,
) -> UUID:
    """One posted transfer, idempotent on its key; the replay returns the first id."""
    transfer_id = await insert_posted(
        conn, debit, credit, amount, kind, idempotency_key, fingerprint
    )
    if transfer_id is None:
        return await replay(conn, idempotency_key, fingerprint)
    deltas: dict[UUID, Delta] = defaultdict(Delta)
    deltas[debit].debits_posted += amount
    deltas[credit].credits_posted += amount
    try:
        await apply_deltas(conn, deltas)
    except asyncpg.CheckViolationError:
        raise InsufficientQuota(f"Not enough available credits to move {amount}") from None
    except asyncpg.NumericValueOutOfRangeError:
        raise InvalidArgument(
            "The balance would exceed the largest amount the ledger holds",
            field="amount_micro_credits",
        ) from None
    return transfer_id


async def ledger_account_id(conn: Connection, account_id: UUID, kind: str) -> UUID:
    found: UUID | None = await conn.fetchval(
        "SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = $2", account_id, kind
    )
    if found is None:
        raise NotFound(f"Account {account_id} not found")
    return found


# The settlement policy in force, its latest version, as the row ``p``.
CURRENT_POLICY = "settlement_policies p ORDER BY p.version DESC LIMIT 1"


async def current_policy(conn: Connection) -> SettlementPolicy:
    row = await conn.fetchrow(f"SELECT p.* FROM {CURRENT_POLICY}")
    assert row is not None  # migration 0004 inserts the first version
    return policy_from_row(row)


def policy_from_row(row: Record) -> SettlementPolicy:
    return SettlementPolicy(
        operator_share_bps=row["operator_share_bps"],
        platform_fee_bps=row["platform_fee_bps"],
        epoch_seconds=row["epoch_seconds"],
        min_payout=row["min_payout"],
        max_payout=row["max_payout"],
        version=row["version"],
        created_at=row["created_at"],
    )


async def read_balance(conn: Connection, account_id: UUID) -> Balance | None:
    rows = await conn.fetch(
        f"""SELECT kind, {AVAILABLE} AS available, debits_pending FROM ledger_accounts
            WHERE owner_id = $1 AND kind IN ('consumer', 'operator')""",
        account_id,
    )
    by_kind = {row["kind"]: row for row in rows}
    consumer, operator = by_kind.get("consumer"), by_kind.get("operator")
    if consumer is None:
        return None
    return Balance(
        account_id=account_id,
        available=consumer["available"],
        held=consumer["debits_pending"],
        earned=0 if operator is None else operator["available"],
        payout_pending=0 if operator is None else operator["debits_pending"],
    )
