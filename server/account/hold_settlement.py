"""Settling holds in PostgreSQL: one hold or a batch of them in two statements.

The first reads the holds with what settling them needs (their operators'
ledger accounts, the policy in force); ledger.resolve_hold then decides each
settlement: a hold no longer pending makes it a replay or a refusal. The
second statement writes every settlement decided in one go, each only if its
hold is still pending when the statement reaches its row (the resolution is a
compare-and-set under the row lock, so a hold resolves at most once):
resolutions, captures, contribution records and their events in the outbox,
and last the running totals, each account once for the batch, moved in lock
order by ledger_move (migration 0009). A settlement whose hold was resolved
in between writes nothing; reading it again makes it a replay or a refusal.
Being one statement, the write commits as it ends: shared rows (an operator's
account, the platform's shards) stay locked only for its updates and the
commit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from core.errors import DomainError, NotFound
from server.account.ledger import (
    Hold,
    HoldStatus,
    SettlementLine,
    resolve_hold,
    split_capture,
)
from server.account.ledger_sql import CURRENT_POLICY, SYSTEM_IDS, Delta, Record, policy_from_row

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
    pool: asyncpg.Pool[Record], settlements: Sequence[Settlement]
) -> list[Hold | DomainError | None]:
    """Settles each of ``settlements`` (distinct holds).

    A settlement the ledger refuses (unknown hold or operator, a conflicting
    resolution, a capture above the hold) is that item's outcome and writes
    nothing. None: the hold was resolved by someone else between the read and
    the write; settling it again decides.
    """
    owners = sorted({line.operator_account_id for s in settlements for line in s.lines})
    rows = await pool.fetch(_READ_FOR_SETTLEMENT, [s.hold_id for s in settlements], owners)
    found = {row["id"]: row for row in rows}
    writes = _Writes()
    outcomes: list[Hold | DomainError | None] = []
    for settlement in settlements:
        row = found.get(settlement.hold_id)
        try:
            if row is None:
                raise NotFound(f"Hold {settlement.hold_id} not found")
            outcomes.append(writes.add(row, settlement))
        except DomainError as error:
            outcomes.append(error)
    written = await writes.apply(pool)
    return [
        None if isinstance(outcome, Hold) and outcome.hold_id in writes.holds - written else outcome
        for outcome in outcomes
    ]


# The holds with what settling them needs: their operators' ledger accounts
# (pairs of owner and ledger account) and the policy in force.
_READ_FOR_SETTLEMENT = f"""
    SELECT {HOLD_COLUMNS}, t.debit_account_id, t.credit_account_id, t.settle_fingerprint,
           (SELECT array_agg(ARRAY[o.owner_id, o.id]) FROM ledger_accounts o
            WHERE o.kind = 'operator' AND o.owner_id = ANY($2::uuid[])) AS operators,
           (SELECT p FROM {CURRENT_POLICY}) AS policy
    FROM {HOLD_FROM} WHERE t.id = ANY($1::uuid[]) AND t.kind = 'hold'"""

# The holds' resolutions (each only if still pending), then for those resolved
# their captures, contribution records, events in the outbox and the running
# totals, in one statement.
_WRITE_SETTLEMENTS = """
    WITH resolved AS (
        UPDATE transfers t SET status = r.status, captured = r.captured, resolved_at = now(),
                               settle_fingerprint = r.fingerprint
        FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[])
             AS r(id, status, captured, fingerprint)
        WHERE t.id = ANY($1::uuid[]) AND t.id = r.id AND t.status = 'pending'
        RETURNING t.id
    ), captures AS (
        INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, status,
                               pending_id)
        SELECT gen_random_uuid(), c.debit, c.credit, c.amount, 'capture', 'posted', c.hold
        FROM unnest($5::uuid[], $6::uuid[], $7::uuid[], $8::bigint[])
             AS c(hold, debit, credit, amount)
        JOIN resolved ON resolved.id = c.hold
    ), recorded AS (
        INSERT INTO contributions (id, hold_id, operator_account_id, node_id, model, tokens,
                                   amount, epoch)
        SELECT gen_random_uuid(), r.hold, r.operator, r.node, r.model, r.tokens, r.amount,
               floor(extract(epoch FROM now()) / $9)::bigint
        FROM unnest($10::uuid[], $11::uuid[], $12::text[], $13::text[], $14::bigint[],
                    $15::bigint[]) AS r(hold, operator, node, model, tokens, amount)
        JOIN resolved ON resolved.id = r.hold
        RETURNING id, hold_id, operator_account_id, node_id, model, tokens, amount, epoch,
                  created_at
    ), moved AS (
        SELECT ledger_move(array_agg(m.account ORDER BY m.system, m.account),
                           array_agg(m.debits_pending ORDER BY m.system, m.account),
                           array_agg(m.debits_posted ORDER BY m.system, m.account),
                           array_agg(m.credits_pending ORDER BY m.system, m.account),
                           array_agg(m.credits_posted ORDER BY m.system, m.account))
        FROM (SELECT d.account, d.system, sum(d.debits_pending)::bigint AS debits_pending,
                     sum(d.debits_posted)::bigint AS debits_posted,
                     sum(d.credits_pending)::bigint AS credits_pending,
                     sum(d.credits_posted)::bigint AS credits_posted
              FROM unnest($19::uuid[], $20::uuid[], $21::boolean[], $22::bigint[],
                          $23::bigint[], $24::bigint[], $25::bigint[])
                   AS d(hold, account, system, debits_pending, debits_posted, credits_pending,
                        credits_posted)
              JOIN resolved ON resolved.id = d.hold
              GROUP BY d.account, d.system) m
    ), events AS (
        INSERT INTO ledger_outbox (id, kind, payload)
        SELECT gen_random_uuid(), 'usage.settled',
               jsonb_build_object('hold_id', u.hold, 'account_id', u.account,
                                  'status', u.status, 'held', u.held, 'captured', u.captured,
                                  'total_tokens', u.total_tokens, 'settled_at', now())
        FROM unnest($1::uuid[], $16::uuid[], $2::text[], $17::bigint[], $3::bigint[],
                    $18::bigint[]) AS u(hold, account, status, held, captured, total_tokens)
        JOIN resolved ON resolved.id = u.hold
        UNION ALL
        SELECT gen_random_uuid(), 'contribution.recorded',
               jsonb_build_object('contribution_id', id, 'hold_id', hold_id,
                                  'operator_account_id', operator_account_id,
                                  'node_id', node_id, 'model', model, 'tokens', tokens,
                                  'amount', amount, 'epoch', epoch, 'recorded_at', created_at)
        FROM recorded
    )
    SELECT resolved.id FROM resolved, moved"""


@dataclass
class _Writes:
    """The settlements of a batch, as the columns of _WRITE_SETTLEMENTS: per hold its
    resolution, captures, contribution records and deltas of the running totals."""

    epoch_seconds: int = 0
    resolved: list[tuple[UUID, str, int, str, UUID, int, int]] = field(default_factory=list)
    captures: list[tuple[UUID, UUID, UUID, int]] = field(default_factory=list)
    contributions: list[tuple[UUID, UUID, str, str, int, int]] = field(default_factory=list)
    moves: list[tuple[UUID, UUID, bool, int, int, int, int]] = field(default_factory=list)
    holds: set[UUID] = field(default_factory=set)

    def add(self, row: Record, settlement: Settlement) -> Hold:
        """The hold in ``row`` settled by ``settlement``; a replay writes nothing."""
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
        self.holds.add(hold.hold_id)
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
        deltas: dict[UUID, Delta] = defaultdict(Delta)
        deltas[consumer].debits_pending -= amount
        deltas[consumer].debits_posted += capture
        deltas[revenue].credits_pending -= amount
        credited = [(revenue, platform)] + [
            (operators[line.operator_account_id], part)
            for line, part in zip(lines, parts, strict=True)
        ]
        for credit, moved in credited:
            if moved:
                self.captures.append((hold.hold_id, consumer, credit, moved))
                deltas[credit].credits_posted += moved
        self.contributions += [
            (hold.hold_id, line.operator_account_id, line.node_id, line.model, line.tokens, part)
            for line, part in zip(lines, parts, strict=True)
        ]
        self.moves += [
            (
                hold.hold_id,
                account,
                account in SYSTEM_IDS,
                d.debits_pending,
                d.debits_posted,
                d.credits_pending,
                d.credits_posted,
            )
            for account, d in deltas.items()
        ]
        return Hold(hold.hold_id, hold.account_id, amount, capture, status, hold.expires_at)

    async def apply(self, pool: asyncpg.Pool[Record]) -> set[UUID]:
        """Writes the settlements; the holds they resolved (those still pending)."""
        if not self.resolved:
            return set()
        rows = await pool.fetch(
            _WRITE_SETTLEMENTS,
            *_columns(self.resolved, 4),
            *_columns(self.captures, 4),
            self.epoch_seconds,
            *_columns(self.contributions, 6),
            *_columns([r[4:] for r in self.resolved], 3),
            *_columns(self.moves, 7),
        )
        return {row["id"] for row in rows}


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
