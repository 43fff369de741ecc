"""PostgreSQL adapter of the credit ledger: transfers, holds, settlement, RCP.

Ledger invariants are kept by the SQL itself: every transfer moves the same
amount between the running totals of two ledger accounts in one
transaction, so the sums over all accounts stay equal; accounts that may not
go negative carry a CHECK constraint as the last line of defence. Lock
order, to keep concurrent transactions free of deadlocks: transfer rows
first, then account rows, then user ledger accounts (by id), then system
ledger accounts (by id).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import asyncpg

from server.account.ledger import (
    Balance,
    Contribution,
    ContributionTotal,
    Hold,
    HoldStatus,
    LedgerSummary,
    SettlementLine,
    SettlementPolicy,
    TopUpResult,
    Transaction,
    TransferKind,
    ensure_same_request,
    referral_bonus,
    resolve_hold,
    split_capture,
)
from server.common.errors import InsufficientQuota, InvalidArgument, NotFound

# Fixed ids of the system ledger accounts; created by migrations 0001 and 0002.
CASH_IN_ID = UUID("00000000-0000-4000-8000-000000000001")
PLATFORM_REVENUE_ID = UUID("00000000-0000-4000-8000-000000000002")
PROMO_POOL_ID = UUID("00000000-0000-4000-8000-000000000003")
_SYSTEM_IDS = frozenset({CASH_IN_ID, PLATFORM_REVENUE_ID, PROMO_POOL_ID})

Record = asyncpg.Record
if TYPE_CHECKING:  # the proxy is generic only in the type stubs
    Connection = asyncpg.pool.PoolConnectionProxy[Record]

_HOLD_COLUMNS = """t.id, la.owner_id, t.amount, t.captured, t.status, t.expires_at,
                   t.request_fingerprint"""
_HOLD_FROM = "transfers t JOIN ledger_accounts la ON la.id = t.debit_account_id"
_AVAILABLE = "credits_posted - debits_posted - debits_pending"


@dataclass(slots=True)
class _Delta:
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0


def _hold(row: Record) -> Hold:
    return Hold(
        hold_id=row["id"],
        account_id=row["owner_id"],
        amount=row["amount"],
        captured=row["captured"],
        status=HoldStatus(row["status"]),
        expires_at=row["expires_at"],
    )


def _balance(owner_id: UUID, consumer: Record, earned: int) -> Balance:
    return Balance(
        account_id=owner_id,
        available=consumer["credits_posted"]
        - consumer["debits_posted"]
        - consumer["debits_pending"],
        held=consumer["debits_pending"],
        earned=earned,
    )


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


class PostgresLedgerStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    # balances and history

    async def get_balance(self, account_id: UUID) -> Balance | None:
        async with self._pool.acquire() as conn:
            return await _read_balance(conn, account_id)

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
                    hold_status=HoldStatus(row["status"]) if kind is TransferKind.HOLD else None,
                    hold_id=row["pending_id"],
                    created_at=row["created_at"],
                    operator_earnings=mine[side] == "operator",
                )
            )
        return result

    async def summary(self) -> LedgerSummary:
        row = await self._pool.fetchrow(
            f"""SELECT sum(debits_posted) AS debits, sum(credits_posted) AS credits,
                       sum(credits_posted - debits_posted) FILTER (WHERE id = $1) AS cash_in,
                       sum(credits_posted - debits_posted) FILTER (WHERE id = $2) AS revenue,
                       sum({_AVAILABLE}) FILTER (WHERE id = $3) AS pool
                FROM ledger_accounts""",
            CASH_IN_ID,
            PLATFORM_REVENUE_ID,
            PROMO_POOL_ID,
        )
        assert row is not None
        # sum() over bigint is numeric in PostgreSQL: convert to int.
        return LedgerSummary(
            *(int(row[name] or 0) for name in ("cash_in", "revenue", "pool", "debits", "credits"))
        )

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
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await _ledger_account_id(conn, account_id, "consumer")
            # Inserting first makes concurrent calls with one key queue on the
            # unique index: the first one does the work, the others replay it.
            transfer_id = await _insert_posted(
                conn,
                CASH_IN_ID,
                consumer,
                amount,
                TransferKind.TOP_UP,
                idempotency_key,
                fingerprint,
            )
            if transfer_id is None:
                existing = await _replay(conn, idempotency_key, fingerprint)
                paid = await conn.fetchval(
                    "SELECT amount FROM referral_bonuses WHERE top_up_id = $1", existing
                )
                balance = await _read_balance(conn, account_id)
                assert balance is not None
                return TopUpResult(existing, balance, paid or 0)
            bonus, referrer = 0, None
            if with_bonus:
                bonus, referrer = await _due_referral_bonus(conn, account_id, consumer, amount)
            deltas: dict[UUID, _Delta] = defaultdict(_Delta)
            deltas[consumer].credits_posted += amount
            deltas[CASH_IN_ID].debits_posted += amount
            if referrer is not None:
                deltas[referrer[1]].credits_posted += bonus
                deltas[PROMO_POOL_ID].debits_posted += bonus
            try:
                await _apply(conn, deltas)
            except asyncpg.CheckViolationError:
                # Only the promotional pool can fail here (credits never break a CHECK).
                raise _PoolShort from None
            except asyncpg.NumericValueOutOfRangeError:
                raise InvalidArgument(
                    "The balance would exceed the largest amount the ledger holds",
                    field="amount_micro_credits",
                ) from None
            if referrer is not None:
                bonus_id = await _insert_posted(
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
            balance = await _read_balance(conn, account_id)
            assert balance is not None
            return TopUpResult(transfer_id, balance, bonus)

    async def grant(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult:
        """promo pool -> consumer; fails when the pool is short."""
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await _ledger_account_id(conn, account_id, "consumer")
            transfer_id = await _post(
                conn,
                PROMO_POOL_ID,
                consumer,
                amount,
                TransferKind.GRANT,
                idempotency_key,
                fingerprint,
            )
            balance = await _read_balance(conn, account_id)
            assert balance is not None
            return TopUpResult(transfer_id, balance)

    async def fund_promotional_pool(
        self, amount: int, idempotency_key: str, fingerprint: str
    ) -> tuple[UUID, int]:
        async with self._pool.acquire() as conn, conn.transaction():
            transfer_id = await _post(
                conn,
                CASH_IN_ID,
                PROMO_POOL_ID,
                amount,
                TransferKind.PROMO_FUND,
                idempotency_key,
                fingerprint,
            )
            available = await conn.fetchval(
                f"SELECT {_AVAILABLE} FROM ledger_accounts WHERE id = $1", PROMO_POOL_ID
            )
            return transfer_id, int(available)

    async def post_allowance(
        self, conn: Connection, account_id: UUID, amount: int, idempotency_key: str
    ) -> UUID:
        """cash_in -> consumer on the caller's connection (subscription renewals)."""
        consumer = await _ledger_account_id(conn, account_id, "consumer")
        return await _post(
            conn,
            CASH_IN_ID,
            consumer,
            amount,
            TransferKind.SUBSCRIPTION_ALLOWANCE,
            idempotency_key,
            f"allowance:{account_id}:{amount}",
        )

    # holds

    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold:
        async with self._pool.acquire() as conn, conn.transaction():
            consumer = await _ledger_account_id(conn, account_id, "consumer")
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
                existing = await conn.fetchrow(
                    f"SELECT {_HOLD_COLUMNS} FROM {_HOLD_FROM} WHERE t.idempotency_key = $1",
                    idempotency_key,
                )
                assert existing is not None  # the conflicting row is committed
                ensure_same_request(existing["request_fingerprint"], fingerprint)
                return _hold(existing)
            # Check and reserve in one statement: a concurrent hold on the same
            # account waits for the row and then re-evaluates the condition.
            reserved = await conn.fetchval(
                f"""UPDATE ledger_accounts SET debits_pending = debits_pending + $2
                    WHERE id = $1 AND {_AVAILABLE} >= $2 RETURNING id""",
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

    async def settle_hold(
        self,
        hold_id: UUID,
        capture: int,
        lines: Sequence[SettlementLine],
        fingerprint: str,
    ) -> Hold:
        """Captures ``capture`` (platform fee + operator shares + RCP), releases the rest."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""SELECT {_HOLD_COLUMNS}, t.debit_account_id, t.credit_account_id,
                           t.settle_fingerprint
                    FROM {_HOLD_FROM} WHERE t.id = $1 AND t.kind = 'hold' FOR UPDATE OF t""",
                hold_id,
            )
            if row is None:
                raise NotFound(f"Hold {hold_id} not found")
            hold = _hold(row)
            status = resolve_hold(hold, capture, fingerprint, row["settle_fingerprint"])
            if status is None:
                return hold
            if status is HoldStatus.RELEASED:
                lines = ()
            operators = await _operator_accounts(conn, [x.operator_account_id for x in lines])
            policy = await _policy(conn)
            parts, platform = split_capture(
                capture, policy.operator_share_bps, [x.tokens for x in lines]
            )
            await conn.execute(
                """UPDATE transfers SET status = $2, captured = $3, resolved_at = now(),
                                        settle_fingerprint = $4
                   WHERE id = $1""",
                hold_id,
                status.value,
                capture,
                fingerprint,
            )
            consumer, revenue = row["debit_account_id"], row["credit_account_id"]
            deltas: dict[UUID, _Delta] = defaultdict(_Delta)
            deltas[consumer].debits_pending -= hold.amount
            deltas[consumer].debits_posted += capture
            deltas[revenue].credits_pending -= hold.amount
            deltas[revenue].credits_posted += platform
            for line, part in zip(lines, parts, strict=True):
                if part:
                    deltas[operators[line.operator_account_id]].credits_posted += part
            await _apply(conn, deltas)
            captures = [(revenue, platform)] + [
                (operators[line.operator_account_id], part)
                for line, part in zip(lines, parts, strict=True)
            ]
            for credit, amount in captures:
                if amount:
                    await conn.execute(
                        """INSERT INTO transfers (id, debit_account_id, credit_account_id, amount,
                                                  kind, status, pending_id)
                           VALUES ($1, $2, $3, $4, 'capture', 'posted', $5)""",
                        uuid4(),
                        consumer,
                        credit,
                        amount,
                        hold_id,
                    )
            await conn.executemany(
                """INSERT INTO contributions (id, hold_id, operator_account_id, node_id, model,
                                              tokens, amount, epoch)
                   VALUES ($1, $2, $3, $4, $5, $6, $7,
                           floor(extract(epoch FROM now()) / $8)::bigint)""",
                [
                    (
                        uuid4(),
                        hold_id,
                        line.operator_account_id,
                        line.node_id,
                        line.model,
                        line.tokens,
                        part,
                        policy.epoch_seconds,
                    )
                    for line, part in zip(lines, parts, strict=True)
                ],
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
            deltas: dict[UUID, _Delta] = defaultdict(_Delta)
            for row in rows:
                deltas[row["debit_account_id"]].debits_pending -= row["amount"]
                deltas[row["credit_account_id"]].credits_pending -= row["amount"]
            await _apply(conn, deltas)
        return len(rows)

    # contributions

    async def policy(self) -> SettlementPolicy:
        async with self._pool.acquire() as conn:
            return await _policy(conn)

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


class _PoolShort(InsufficientQuota):
    def __init__(self) -> None:
        super().__init__("The promotional pool cannot pay this amount")


def _lock_order(ledger_account_id: UUID) -> tuple[bool, UUID]:
    return (ledger_account_id in _SYSTEM_IDS, ledger_account_id)


async def _apply(conn: Connection, deltas: Mapping[UUID, _Delta]) -> None:
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


async def _insert_posted(
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


async def _replay(conn: Connection, idempotency_key: str, fingerprint: str) -> UUID:
    row = await conn.fetchrow(
        "SELECT id, request_fingerprint FROM transfers WHERE idempotency_key = $1",
        idempotency_key,
    )
    assert row is not None  # the conflicting row is committed, or we would not get here
    ensure_same_request(row["request_fingerprint"], fingerprint)
    transfer_id: UUID = row["id"]
    return transfer_id


async def _post(
    conn: Connection,
    debit: UUID,
    credit: UUID,
    amount: int,
    kind: TransferKind,
    idempotency_key: str,
    fingerprint: str,
) -> UUID:
    """One posted transfer, idempotent on its key; the replay returns the first id."""
    transfer_id = await _insert_posted(
        conn, debit, credit, amount, kind, idempotency_key, fingerprint
    )
    if transfer_id is None:
        return await _replay(conn, idempotency_key, fingerprint)
    deltas: dict[UUID, _Delta] = defaultdict(_Delta)
    deltas[debit].debits_posted += amount
    deltas[credit].credits_posted += amount
    try:
        await _apply(conn, deltas)
    except asyncpg.CheckViolationError:
        raise InsufficientQuota(f"Not enough available credits to move {amount}") from None
    except asyncpg.NumericValueOutOfRangeError:
        raise InvalidArgument(
            "The balance would exceed the largest amount the ledger holds",
            field="amount_micro_credits",
        ) from None
    return transfer_id


async def _ledger_account_id(conn: Connection, account_id: UUID, kind: str) -> UUID:
    found: UUID | None = await conn.fetchval(
        "SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = $2", account_id, kind
    )
    if found is None:
        raise NotFound(f"Account {account_id} not found")
    return found


async def _operator_accounts(conn: Connection, owners: Sequence[UUID]) -> dict[UUID, UUID]:
    if not owners:
        return {}
    rows = await conn.fetch(
        """SELECT owner_id, id FROM ledger_accounts
           WHERE kind = 'operator' AND owner_id = ANY($1::uuid[])""",
        list(owners),
    )
    found = {row["owner_id"]: row["id"] for row in rows}
    missing = [owner for owner in owners if owner not in found]
    if missing:
        raise NotFound(f"Operator account {missing[0]} not found")
    return found


async def _policy(conn: Connection) -> SettlementPolicy:
    row = await conn.fetchrow("SELECT operator_share_bps, epoch_seconds FROM settlement_policy")
    assert row is not None  # migration 0002 inserts the row
    return SettlementPolicy(row["operator_share_bps"], row["epoch_seconds"])


async def _read_balance(conn: Connection, account_id: UUID) -> Balance | None:
    rows = await conn.fetch(
        "SELECT * FROM ledger_accounts WHERE owner_id = $1 AND kind IN ('consumer', 'operator')",
        account_id,
    )
    by_kind = {row["kind"]: row for row in rows}
    if "consumer" not in by_kind:
        return None
    operator = by_kind.get("operator")
    earned = 0 if operator is None else operator["credits_posted"] - operator["debits_posted"]
    return _balance(account_id, by_kind["consumer"], earned)


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
        f"SELECT {_AVAILABLE} FROM ledger_accounts WHERE id = $1", PROMO_POOL_ID
    )
    if pool_available < bonus:
        return 0, None
    referrer_ledger = await _ledger_account_id(conn, referrer_id, "consumer")
    return bonus, (referrer_id, referrer_ledger)
