"""PostgreSQL adapter of the credit ledger's posted transfers: balances, history,
top-ups (with referral bonuses), grants and the promotional pool.

Holds are in hold_store.py, contribution records in contribution_store.py,
the shared SQL and the invariants it keeps in ledger_sql.py.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from uuid import UUID

import asyncpg

from core.errors import InsufficientQuota, InvalidArgument, NotFound
from server.account.ledger import (
    Balance,
    HoldStatus,
    LedgerSummary,
    TopUpResult,
    Transaction,
    TransferKind,
    referral_bonus,
)
from server.account.ledger_sql import (
    AVAILABLE,
    CASH_IN,
    CASH_OUT,
    PLATFORM_REVENUE,
    PROMO_POOL_ID,
    Connection,
    Delta,
    Record,
    apply_deltas,
    insert_posted,
    ledger_account_id,
    post,
    read_balance,
    replay,
)

_RESERVATIONS = (TransferKind.HOLD, TransferKind.PAYOUT)


class PostgresLedgerStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    # balances and history

    async def get_balance(self, account_id: UUID) -> Balance | None:
        async with self._pool.acquire() as conn:
            return await read_balance(conn, account_id)

    async def list_transactions(
        self, account_id: UUID, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Transaction]:
        async with self._pool.acquire() as conn:
            mine = {
                row["id"]: row["kind"]
                for row in await conn.fetch(
                    "SELECT id, kind FROM ledger_accounts WHERE owner_id = $1", account_id
                )
            }
            if not mine:
                raise NotFound(f"Account {account_id} not found")
            rows = await conn.fetch(
                """SELECT id, kind, status, amount, pending_id, created_at,
                          debit_account_id, credit_account_id
                   FROM transfers
                   WHERE (debit_account_id = ANY($1::uuid[]) OR credit_account_id = ANY($1::uuid[]))
                     AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
                   ORDER BY created_at DESC, id DESC LIMIT $4""",
                list(mine),
                after[0] if after else None,
                after[1] if after else None,
                limit,
            )
        result = []
        for row in rows:
            debited = row["debit_account_id"] in mine
            side = row["debit_account_id"] if debited else row["credit_account_id"]
            kind = TransferKind(row["kind"])
            result.append(
                Transaction(
                    transfer_id=row["id"],
                    kind=kind,
                    amount=-row["amount"] if debited else row["amount"],
                    hold_status=HoldStatus(row["status"]) if kind in _RESERVATIONS else None,
                    hold_id=row["pending_id"],
                    created_at=row["created_at"],
                    operator_earnings=mine[side] == "operator",
                )
            )
        return result

    async def summary(self) -> LedgerSummary:
        """One snapshot of the ledger's totals; a sharded account is the sum of its shards."""
        row = await self._pool.fetchrow(
            f"""SELECT sum(debits_posted) AS debits, sum(credits_posted) AS credits,
                       sum(credits_posted - debits_posted) FILTER (WHERE kind = $1) AS cash_in,
                       sum(credits_posted - debits_posted) FILTER (WHERE kind = $2) AS revenue,
                       sum({AVAILABLE}) FILTER (WHERE id = $3) AS pool,
                       sum(credits_posted - debits_posted) FILTER (WHERE kind = $4) AS cash_out
                FROM ledger_accounts""",
            CASH_IN.kind,
            PLATFORM_REVENUE.kind,
            PROMO_POOL_ID,
            CASH_OUT.kind,
        )
        assert row is not None
        # sum() over bigint is numeric in PostgreSQL: convert to int.
        names = ("cash_in", "revenue", "pool", "debits", "credits", "cash_out")
        return LedgerSummary(*(int(row[name] or 0) for name in names))

    # posted transfers

    async def top_up(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult:
        """cash_in -> consumer, and the referrer's bonus (promo pool -> referrer), if due.

        The bonus is never created: if the pool runs short between the check
        and the transfer, the top-up is retried without it.
        """
        try:
            return await self._top_up(account_id, amount, idempotency_key, fingerprint, True)
        except _PoolShort:
            return await self._top_up(account_id, amount, idempotency_key, fingerprint, False)

    async def _top_up(
        self,
        account_id: UUID,
        amount: int,
        idempotency_key: str,
        fingerprint: str,
        with_bonus: bool,
    ) -> TopUpResult:
        cash_in = CASH_IN.any_shard()
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await ledger_account_id(conn, account_id, "consumer")
            # Inserting first makes concurrent calls with one key queue on the
            # unique index: the first one does the work, the others replay it.
            transfer_id = await insert_posted(
                conn,
                cash_in,
                consumer,
                amount,
                TransferKind.TOP_UP,
                idempotency_key,
                fingerprint,
            )
            if transfer_id is None:
                existing = await replay(conn, idempotency_key, fingerprint)
                paid = await conn.fetchval(
                    "SELECT amount FROM referral_bonuses WHERE top_up_id = $1", existing
                )
                balance = await read_balance(conn, account_id)
                assert balance is not None
                return TopUpResult(existing, balance, paid or 0)
            bonus, referrer = 0, None
            if with_bonus:
                bonus, referrer = await _due_referral_bonus(conn, account_id, consumer, amount)
            deltas: dict[UUID, Delta] = defaultdict(Delta)
            deltas[consumer].credits_posted += amount
            deltas[cash_in].debits_posted += amount
            if referrer is not None:
                deltas[referrer[1]].credits_posted += bonus
                deltas[PROMO_POOL_ID].debits_posted += bonus
            try:
                await apply_deltas(conn, deltas)
            except asyncpg.CheckViolationError:
                # Only the promotional pool can fail here (credits never break a CHECK).
                raise _PoolShort from None
            except asyncpg.NumericValueOutOfRangeError:
                raise InvalidArgument(
                    "The balance would exceed the largest amount the ledger holds",
                    field="amount_micro_credits",
                ) from None
            if referrer is not None:
                bonus_id = await insert_posted(
                    conn, PROMO_POOL_ID, referrer[1], bonus, TransferKind.REFERRAL_BONUS
                )
                await conn.execute(
                    """INSERT INTO referral_bonuses
                           (top_up_id, transfer_id, referrer_id, referee_id, amount)
                       VALUES ($1, $2, $3, $4, $5)""",
                    transfer_id,
                    bonus_id,
                    referrer[0],
                    account_id,
                    bonus,
                )
            balance = await read_balance(conn, account_id)
            assert balance is not None
            return TopUpResult(transfer_id, balance, bonus)

    async def grant(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult:
        """promo pool -> consumer; fails when the pool is short."""
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await ledger_account_id(conn, account_id, "consumer")
            transfer_id = await post(
                conn,
                PROMO_POOL_ID,
                consumer,
                amount,
                TransferKind.GRANT,
                idempotency_key,
                fingerprint,
            )
            balance = await read_balance(conn, account_id)
            assert balance is not None
            return TopUpResult(transfer_id, balance)

    async def fund_promotional_pool(
        self, amount: int, idempotency_key: str, fingerprint: str
    ) -> tuple[UUID, int]:
        async with self._pool.acquire() as conn, conn.transaction():
            transfer_id = await post(
                conn,
                CASH_IN.any_shard(),
                PROMO_POOL_ID,
                amount,
                TransferKind.PROMO_FUND,
                idempotency_key,
                fingerprint,
            )
            available = await conn.fetchval(
                f"SELECT {AVAILABLE} FROM ledger_accounts WHERE id = $1", PROMO_POOL_ID
            )
            return transfer_id, int(available)


class _PoolShort(InsufficientQuota):
    def __init__(self) -> None:
        super().__init__("The promotional pool cannot pay this amount")


async def _due_referral_bonus(
    conn: Connection, account_id: UUID, consumer: UUID, amount: int
) -> tuple[int, tuple[UUID, UUID] | None]:
    """The bonus this top-up earns the referrer, and (referrer, referrer's ledger account).

    Locks the referee's account row so that its concurrent top-ups count
    prior top-ups and paid bonuses one at a time (the cap holds). The bonus
    is 0 when the promotional pool cannot pay all of it.
    """
    referrer_id: UUID | None = await conn.fetchval(
        "SELECT referred_by FROM accounts WHERE id = $1 FOR NO KEY UPDATE", account_id
    )
    if referrer_id is None:
        return 0, None
    rules = await conn.fetchrow("SELECT * FROM referral_rules")
    assert rules is not None
    stats = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM transfers
                   WHERE kind = 'top_up' AND credit_account_id = $1) - 1 AS prior,
                  (SELECT coalesce(sum(amount), 0) FROM referral_bonuses
                   WHERE referee_id = $2) AS paid""",
        consumer,
        account_id,
    )
    assert stats is not None
    bonus = referral_bonus(
        amount,
        bonus_bps=rules["bonus_bps"],
        rewarded_top_ups=rules["rewarded_top_ups"],
        max_bonus=rules["max_bonus"],
        prior_top_ups=stats["prior"],
        paid_so_far=int(stats["paid"]),
    )
    if not bonus:
        return 0, None
    pool_available = await conn.fetchval(
        f"SELECT {AVAILABLE} FROM ledger_accounts WHERE id = $1", PROMO_POOL_ID
    )
    if pool_available < bonus:
        return 0, None
    referrer_ledger = await ledger_account_id(conn, referrer_id, "consumer")
    return bonus, (referrer_id, referrer_ledger)
