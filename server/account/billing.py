"""BillingService: the credit ledger, holds and settlement, as domain calls.

Checks the caller, validates input, computes fingerprints, then calls the
stores (ledger_store.py, hold_store.py), which take every decision that
needs the database's locks. Imports neither grpc nor generated code nor
storage clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol
from uuid import UUID

import structlog

from core.errors import InvalidArgument, NotFound
from core.ids import parse_id
from server.account.authz import Principal
from server.account.ledger import (
    Balance,
    Hold,
    LedgerSummary,
    SettlementLine,
    TopUpResult,
    Transaction,
    request_fingerprint,
    settle_fingerprint,
    validate_amount,
    validate_capture,
    validate_idempotency_key,
    validate_lines,
)
from server.account.metrics import LedgerMetrics
from server.common.paging import decode_cursor, encode_cursor, page_size

log = structlog.get_logger(__name__)


class LedgerStore(Protocol):
    """Posted transfers and balances. Each method runs as one transaction and
    raises the ledger's DomainErrors (NotFound, InsufficientQuota,
    IdempotencyKeyReused) itself, because those decisions must be taken under
    the transaction's locks."""

    async def get_balance(self, account_id: UUID) -> Balance | None: ...
    async def list_transactions(
        self, account_id: UUID, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Transaction]: ...
    async def summary(self) -> LedgerSummary: ...
    async def top_up(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult: ...
    async def grant(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult: ...
    async def fund_promotional_pool(
        self, amount: int, idempotency_key: str, fingerprint: str
    ) -> tuple[UUID, int]: ...


class HoldStore(Protocol):
    """Holds, one transaction each; also raises HoldAlreadyResolved."""

    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold: ...
    async def settle_hold(
        self,
        hold_id: UUID,
        capture: int,
        lines: Sequence[SettlementLine],
        total_tokens: int,
        fingerprint: str,
    ) -> Hold: ...
    async def release_expired_holds(self, limit: int) -> int: ...


class BillingService:
    def __init__(
        self,
        store: LedgerStore,
        holds: HoldStore,
        *,
        default_hold_ttl: timedelta = timedelta(minutes=10),
        max_hold_ttl: timedelta = timedelta(days=1),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: LedgerMetrics | None = None,
    ) -> None:
        self._metrics = metrics or LedgerMetrics()
        self._store = store
        self._holds = holds
        self._default_hold_ttl = default_hold_ttl
        self._max_hold_ttl = max_hold_ttl
        self._clock = clock

    # money in

    async def top_up(
        self, caller: Principal, account_id: str, amount: int, idempotency_key: str
    ) -> TopUpResult:
        caller.require_admin()
        owner = parse_id(account_id, field="account_id")
        validate_amount(amount, field="amount_micro_credits")
        validate_idempotency_key(idempotency_key)
        fingerprint = request_fingerprint("top_up", owner, amount)
        result = await self._store.top_up(owner, amount, idempotency_key, fingerprint)
        log.info(
            "top-up",
            account_id=account_id,
            transfer_id=str(result.transfer_id),
            amount=amount,
            referral_bonus=result.referral_bonus,
        )
        return result

    async def grant(
        self, caller: Principal, account_id: str, amount: int, idempotency_key: str
    ) -> TopUpResult:
        caller.require_admin()
        owner = parse_id(account_id, field="account_id")
        validate_amount(amount, field="amount_micro_credits")
        validate_idempotency_key(idempotency_key)
        fingerprint = request_fingerprint("grant", owner, amount)
        result = await self._store.grant(owner, amount, idempotency_key, fingerprint)
        log.info("grant", account_id=account_id, transfer_id=str(result.transfer_id), amount=amount)
        return result

    async def fund_promotional_pool(
        self, caller: Principal, amount: int, idempotency_key: str
    ) -> tuple[UUID, int]:
        caller.require_admin()
        validate_amount(amount, field="amount_micro_credits")
        validate_idempotency_key(idempotency_key)
        fingerprint = request_fingerprint("promo_fund", amount)
        result = await self._store.fund_promotional_pool(amount, idempotency_key, fingerprint)
        log.info("promotional pool funded", transfer_id=str(result[0]), amount=amount)
        return result

    # reading

    async def get_balance(self, caller: Principal, account_id: str) -> Balance:
        owner = parse_id(account_id, field="account_id")
        caller.require_access(owner)
        balance = await self._store.get_balance(owner)
        if balance is None:
            raise NotFound(f"Account {account_id} not found")
        return balance

    async def list_transactions(
        self, caller: Principal, account_id: str, requested_size: int, page_token: str
    ) -> tuple[list[Transaction], str]:
        owner = parse_id(account_id, field="account_id")
        caller.require_access(owner)
        limit = page_size(requested_size)
        items = await self._store.list_transactions(owner, limit, decode_cursor(page_token))
        last = items[-1] if len(items) == limit else None
        return items, "" if last is None else encode_cursor(last.created_at, last.transfer_id)

    async def summary(self, caller: Principal) -> LedgerSummary:
        caller.require_admin()
        return await self._store.summary()

    # holds

    async def create_hold(
        self,
        caller: Principal,
        account_id: str,
        amount: int,
        idempotency_key: str,
        expires_at: datetime | None,
    ) -> Hold:
        """Reserves ``amount``; without ``expires_at`` the hold lasts the default TTL.

        A replay returns the first hold, with the first call's expiry.
        """
        caller.require_admin()
        owner = parse_id(account_id, field="account_id")
        validate_amount(amount, field="amount_micro_credits")
        validate_idempotency_key(idempotency_key)
        now = self._clock()
        if expires_at is None:
            expires_at = now + self._default_hold_ttl
        elif not now < expires_at <= now + self._max_hold_ttl:
            raise InvalidArgument(
                f"expires must be in the future and at most {self._max_hold_ttl} away",
                field="expires",
            )
        # The expiry is left out of the fingerprint: a caller retrying with a
        # recomputed deadline is still replaying the same reservation.
        fingerprint = request_fingerprint("hold", owner, amount)
        hold = await self._holds.create_hold(
            owner, amount, expires_at, idempotency_key, fingerprint
        )
        self._metrics.holds_created.inc()
        log.debug("hold created", account_id=account_id, hold_id=str(hold.hold_id), amount=amount)
        return hold

    async def settle_hold(
        self,
        caller: Principal,
        hold_id: str,
        capture: int,
        lines: Sequence[SettlementLine] = (),
        total_tokens: int = 0,
    ) -> Hold:
        """Captures ``capture``, splitting the operators' share over ``total_tokens``
        (0: the lines' sum), and releases the rest of the hold."""
        caller.require_admin()
        validate_capture(capture, field="capture_micro_credits")
        lines, total_tokens = validate_lines(lines, total_tokens)
        hold = await self._holds.settle_hold(
            parse_id(hold_id, field="hold_id"),
            capture,
            lines,
            total_tokens,
            settle_fingerprint(capture, lines, total_tokens),
        )
        self._metrics.holds_settled.inc()
        log.debug(
            "hold settled",
            hold_id=hold_id,
            captured=hold.captured,
            status=hold.status.name,
            operators=len(lines),
            total_tokens=total_tokens,
        )
        return hold

    async def release_expired_holds(self, *, batch_size: int = 500) -> int:
        """Releases every hold past its expiry, in batches; returns how many."""
        released = 0
        while True:
            count = await self._holds.release_expired_holds(batch_size)
            self._metrics.holds_expired.inc(amount=count)
            released += count
            if count < batch_size:
                break
        if released:
            log.info("expired holds released", count=released)
        return released
