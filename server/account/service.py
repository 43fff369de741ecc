"""AccountService: accounts, API keys and the credit ledger, as domain calls.

Validates input, then calls the store (a port, implemented over PostgreSQL
in store.py). Imports neither grpc nor generated code nor storage clients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from uuid import UUID

import structlog

from server.account.api_keys import (
    ApiKey,
    GeneratedKey,
    IssuedApiKey,
    generate_api_key,
    hash_api_key,
    validate_api_key,
)
from server.account.ledger import (
    Balance,
    Hold,
    TopUpResult,
    request_fingerprint,
    validate_amount,
    validate_capture,
    validate_idempotency_key,
)
from server.common.errors import InvalidApiKey, InvalidArgument, NotFound

log = structlog.get_logger(__name__)

MAX_NAME_LENGTH = 200


@dataclass(frozen=True)
class Account:
    account_id: UUID
    name: str
    created_at: datetime
    disabled: bool = False


class AccountStore(Protocol):
    """Persistence the service needs. Ledger methods run as one transaction each
    and raise the ledger's DomainErrors (NotFound, InsufficientQuota,
    IdempotencyKeyReused, HoldAlreadyResolved) themselves, because those
    decisions must be taken under the transaction's locks."""

    async def insert_account(self, name: str) -> Account: ...
    async def get_account(self, account_id: UUID) -> Account | None: ...
    async def insert_api_key(
        self, account_id: UUID, name: str, key: GeneratedKey
    ) -> ApiKey | None: ...
    async def find_active_api_key(self, key_hash: str) -> ApiKey | None: ...
    async def revoke_api_key(self, api_key_id: UUID) -> bool: ...
    async def top_up(
        self, account_id: UUID, amount: int, idempotency_key: str, fingerprint: str
    ) -> TopUpResult: ...
    async def get_balance(self, account_id: UUID) -> Balance | None: ...
    async def create_hold(
        self,
        account_id: UUID,
        amount: int,
        expires_at: datetime,
        idempotency_key: str,
        fingerprint: str,
    ) -> Hold: ...
    async def settle_hold(self, hold_id: UUID, capture: int) -> Hold: ...
    async def release_expired_holds(self, limit: int) -> int: ...


def parse_id(value: str, *, field: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be a UUID", field=field) from None


def _validate_name(name: str, *, field: str, required: bool) -> str:
    name = name.strip()
    if (required and not name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"{field} must be {'1' if required else '0'} to {MAX_NAME_LENGTH} characters",
            field=field,
        )
    return name


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        *,
        default_hold_ttl: timedelta = timedelta(minutes=10),
        max_hold_ttl: timedelta = timedelta(days=1),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._default_hold_ttl = default_hold_ttl
        self._max_hold_ttl = max_hold_ttl
        self._clock = clock

    # accounts

    async def create_account(self, name: str) -> Account:
        account = await self._store.insert_account(
            _validate_name(name, field="name", required=True)
        )
        log.info("account created", account_id=str(account.account_id))
        return account

    async def get_account(self, account_id: str) -> Account:
        account = await self._store.get_account(parse_id(account_id, field="account_id"))
        if account is None:
            raise NotFound(f"Account {account_id} not found")
        return account

    # API keys

    async def create_api_key(self, account_id: str, name: str) -> IssuedApiKey:
        owner = parse_id(account_id, field="account_id")
        key = generate_api_key()
        stored = await self._store.insert_api_key(
            owner, _validate_name(name, field="name", required=False), key
        )
        if stored is None:
            raise NotFound(f"Account {account_id} not found")
        log.info(
            "api key created",
            account_id=account_id,
            api_key_id=str(stored.api_key_id),
            prefix=stored.prefix,
        )
        return IssuedApiKey(api_key=stored, secret=key.secret)

    async def authenticate_api_key(self, secret: str) -> ApiKey:
        """The active key behind ``secret``; malformed, unknown and revoked keys
        (and keys of disabled accounts) all fail the same way."""
        key = await self._store.find_active_api_key(hash_api_key(validate_api_key(secret)))
        if key is None:
            raise InvalidApiKey("Invalid API key")
        return key

    async def revoke_api_key(self, api_key_id: str) -> None:
        if not await self._store.revoke_api_key(parse_id(api_key_id, field="api_key_id")):
            raise NotFound(f"API key {api_key_id} not found")
        log.info("api key revoked", api_key_id=api_key_id)

    # ledger

    async def top_up(self, account_id: str, amount: int, idempotency_key: str) -> TopUpResult:
        owner = parse_id(account_id, field="account_id")
        validate_amount(amount, field="amount_micro_credits")
        validate_idempotency_key(idempotency_key)
        fingerprint = request_fingerprint("top_up", owner, amount)
        result = await self._store.top_up(owner, amount, idempotency_key, fingerprint)
        log.info(
            "top-up", account_id=account_id, transfer_id=str(result.transfer_id), amount=amount
        )
        return result

    async def get_balance(self, account_id: str) -> Balance:
        balance = await self._store.get_balance(parse_id(account_id, field="account_id"))
        if balance is None:
            raise NotFound(f"Account {account_id} not found")
        return balance

    async def create_hold(
        self, account_id: str, amount: int, idempotency_key: str, expires_at: datetime | None
    ) -> Hold:
        """Reserves ``amount``; without ``expires_at`` the hold lasts the default TTL.

        A replay returns the first hold, with the first call's expiry.
        """
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
        hold = await self._store.create_hold(
            owner, amount, expires_at, idempotency_key, fingerprint
        )
        log.debug("hold created", account_id=account_id, hold_id=str(hold.hold_id), amount=amount)
        return hold

    async def settle_hold(self, hold_id: str, capture: int) -> Hold:
        hold = await self._store.settle_hold(
            parse_id(hold_id, field="hold_id"),
            validate_capture(capture, field="capture_micro_credits"),
        )
        log.debug("hold settled", hold_id=hold_id, captured=hold.captured, status=hold.status.name)
        return hold

    async def release_expired_holds(self, *, batch_size: int = 500) -> int:
        """Releases every hold past its expiry, in batches; returns how many."""
        released = 0
        while True:
            count = await self._store.release_expired_holds(batch_size)
            released += count
            if count < batch_size:
                break
        if released:
            log.info("expired holds released", count=released)
        return released
