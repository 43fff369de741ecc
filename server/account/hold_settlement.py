"""Settling holds in PostgreSQL: one transaction settles one hold or a batch of them.

The holds' rows are locked first, in id order (as the sweeper locks them), so
each resolves at most once; a hold no longer pending is a replay or a refusal,
decided by ledger.resolve_hold. Then one statement writes every resolution,
capture, contribution record and their events in the outbox, and last the
running totals move, each account once however many of the batch's holds
touched it, in lock order, in the round trip of the COMMIT: shared rows (an
operator's account, the platform's shards) stay locked only for those updates
and the commit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from core.errors import DomainError, NotFound
from server.account.ledger import (
    Hold,
    HoldStatus,
    SettlementLine,
    resolve_hold,
    split_capture,
)
from server.account.ledger_sql import (
    CURRENT_POLICY,
    Delta,
    Record,
    Transaction,
    deltas_sql,
    policy_from_row,
)

HOLD_COLUMNS = """t.id, la.owner_id, t.amount, t.captured, t.status, t.expires_at,
                  t.request_fingerprint"""
HOLD_FROM = "transfers t JOIN ledger_accounts la ON la.id = t.debit_account_id"


def hold_from_row(row: Record) -> Hold:
    return Hold(
        hold_id=row["id"],
        account_id=row["owner_id"],
        amount=row["amount"],
        captured=row["captured"],
        status=HoldStatus(row["status"]),
        expires_at=row["expires_at"],
    )


@dataclass(frozen=True)
class Settlement:
    """What settling one hold asks: validated, with its fingerprint."""

    hold_id: UUID
    capture: int
    lines: tuple[SettlementLine, ...]
    total_tokens: int
    fingerprint: str


async def settle(
    transaction: Transaction, settlements: Sequence[Settlement]
) -> list[Hold | DomainError]:
    """Settles each of ``settlements`` (distinct holds) in the caller's transaction.

    A settlement the ledger refuses (unknown hold or operator, a conflicting
    resolution, a capture above the hold) is that item's outcome and writes
    nothing; the others are written.
    """
    owners = sorted({line.operator_account_id for s in settlements for line in s.lines})
    rows = await transaction.conn.fetch(
        _READ_FOR_SETTLEMENT, [s.hold_id for s in settlements], owners
    )
    found = {row["id"]: row for row in rows}
    writes = _Writes()
    outcomes: list[Hold | DomainError] = []
    for settlement in settlements:
        row = found.get(settlement.hold_id)
        try:
            if row is None:
                raise NotFound(f"Hold {settlement.hold_id} not found")
            outcomes.append(writes.add(row, settlement))
        except DomainError as error:
            outcomes.append(error)
    await writes.apply(transaction)
    return outcomes


# The holds with what settling them needs: their operators' ledger accounts
# (pairs of owner and ledger account) and the policy in force.
_READ_FOR_SETTLEMENT = f"""
    SELECT {HOLD_COLUMNS}, t.debit_account_id, t.credit_account_id, t.settle_fingerprint,
           (SELECT array_agg(ARRAY[o.owner_id, o.id]) FROM ledger_accounts o
            WHERE o.kind = 'operator' AND o.owner_id = ANY($2::uuid[])) AS operators,
           (SELECT p FROM {CURRENT_POLICY}) AS policy
    FROM {HOLD_FROM} WHERE t.id = ANY($1::uuid[]) AND t.kind = 'hold'
    ORDER BY t.id FOR NO KEY UPDATE OF t"""

# The holds' resolutions, their captures, the contribution records and their
# events in the outbox, in one statement.
_WRITE_SETTLEMENTS = """
    WITH resolved AS (
        UPDATE transfers t SET status = r.status, captured = r.captured, resolved_at = now(),
                               settle_fingerprint = r.fingerprint
        FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[])
             AS r(id, status, captured, fingerprint)
        WHERE t.id = r.id
    ), captures AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status,
                               pending_id)
        SELECT gen_random_uuid(), c.debit, c.credit, c.amount, 'capture', 'posted',
               c.hold
        FROM unnest($5::uuid[], $6::uuid[], $7::uuid[], $8::bigint[])
             AS c(hold, debit, credit, amount)
    ), recorded AS (
        INSERT INTO contributions (id, hold_id, operator_account_id, node_id, model, tokens,
                                   amount, epoch)
        SELECT gen_random_uuid(), r.hold, r.operator, r.node, r.model, r.tokens, r.amount,
               floor(extract(epoch FROM now()) / $9)::bigint
        FROM unnest($10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::bigint[],
                    $15::bigint[]) AS r(hold, operator, node, model, tokens, amount)
        RETURNING id, hold_id, operator_account_id, node_id, model, tokens, amount, epoch,
                  created_at
    )
    INSERT INTO ledger_outbox (id, kind, payload)
    SELECT gen_random_uuid(), 'usage.settled',
           jsonb_build_object('hold_id', u.hold, 'account_id', u.account, 'status', u.status,
                              'held', u.held, 'captured', u.captured,
                              'total_tokens', u.total_tokens, 'settled_at', now())
    FROM unnest($1::uuid[], $16::uuid[], $2::text[], $17::bigint[], $3::bigint[],
                $18::bigint[]) AS u(hold, account, status, held, captured, total_tokens)
    UNION ALL
    SELECT gen_random_uuid(), 'contribution.recorded',
           jsonb_build_object('contribution_id', id, 'hold_id', hold_id,
                              'operator_account_id', operator_account_id, 'node_id', node_id,
                              'model', model, 'tokens', tokens, 'amount', amount,
                              'epoch', epoch, 'recorded_at', created_at)
    FROM recorded"""


@dataclass
class _Writes:
    """The settlements of a batch, as the columns of _WRITE_SETTLEMENTS and the
    running totals' deltas."""

    epoch_seconds: int = 0
    resolved: list[tuple[UUID, str, int, str, UUID, int, int]] = field(default_factory=list)
    captures: list[tuple[UUID, UUID, UUID, int]] = field(default_factory=list)
    contributions: list[tuple[UUID, UUID, str, str, int, int]] = field(default_factory=list)
    deltas: dict[UUID, Delta] = field(default_factory=lambda: defaultdict(Delta))

    def add(self, row: Record, settlement: Settlement) -> Hold:
        """The hold in ``row`` (locked) settled by ``settlement``; a replay writes nothing."""
        hold = hold_from_row(row)
        capture = settlement.capture
        status = resolve_hold(hold, capture, settlement.fingerprint, row["settle_fingerprint"])
        if status is None:
            return hold
        lines = () if status is HoldStatus.RELEASED else settlement.lines
        operators = _operator_accounts(row["operators"] or (), lines)
        policy = policy_from_row(row["policy"])
        parts, platform = split_capture(
            capture, policy.operator_share_bps, [x.tokens for x in lines], settlement.total_tokens
        )
        self.epoch_seconds = policy.epoch_seconds
        consumer, revenue, amount = row["debit_account_id"], row["credit_account_id"], row["amount"]
        self.resolved.append(
            (
                hold.hold_id,
                status.value,
                capture,
                settlement.fingerprint,
                hold.account_id,
                amount,
                settlement.total_tokens,
            )
        )
        credited = [(revenue, platform)] + [
            (operators[line.operator_account_id], part)
            for line, part in zip(lines, parts, strict=True)
        ]
        for credit, moved in credited:
            if moved:
                self.captures.append((hold.hold_id, consumer, credit, moved))
                self.deltas[credit].credits_posted += moved
        self.contributions += [
            (hold.hold_id, line.operator_account_id, line.node_id, line.model, line.tokens, part)
            for line, part in zip(lines, parts, strict=True)
        ]
        self.deltas[consumer].debits_pending -= amount
        self.deltas[consumer].debits_posted += capture
        self.deltas[revenue].credits_pending -= amount
        return Hold(hold.hold_id, hold.account_id, amount, capture, status, hold.expires_at)

    async def apply(self, transaction: Transaction) -> None:
        if not self.resolved:
            return
        await transaction.conn.execute(
            _WRITE_SETTLEMENTS,
            *_columns(self.resolved, 4),
            *_columns(self.captures, 4),
            self.epoch_seconds,
            *_columns(self.contributions, 6),
            *_columns([r[4:] for r in self.resolved], 3),
        )
        transaction.finally_run(deltas_sql(self.deltas))


def _columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """The first ``width`` columns of ``rows``, each as a list (an array parameter)."""
    return [[row[i] for row in rows] for i in range(width)]


def _operator_accounts(
    found: Sequence[Sequence[UUID]], lines: Sequence[SettlementLine]
) -> dict[UUID, UUID]:
    """Each line's operator's ledger account, from (owner, ledger account) pairs."""
    accounts = {owner: account for owner, account in found}
    for line in lines:
        if line.operator_account_id not in accounts:
            raise NotFound(f"Operator account {line.operator_account_id} not found")
    return accounts
