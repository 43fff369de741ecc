"""AccountService: callers, accounts, API keys and referrals, as domain calls.

Every public method takes the calling Principal and checks it first, then
validates input and calls the store (a port, implemented over PostgreSQL in
store.py). Imports neither grpc nor generated code nor storage clients.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol
from uuid import UUID

import structlog

from core.errors import InvalidApiKey, NotFound, PermissionDenied
from core.ids import parse_id
from server.account.api_keys import (
    ActiveKey,
    ApiKey,
    GeneratedKey,
    IssuedApiKey,
    KeyHasher,
    KeyPolicy,
    Scope,
    looks_like_api_key,
    validate_api_key,
    validate_policy,
)
from server.account.authz import Principal
from server.account.profiles import (
    Account,
    Referral,
    ReferralRules,
    new_referral_code,
    validate_email,
    validate_name,
    validate_rules,
)
from server.common.credentials import bearer_credential, is_service_token
from server.common.inference_logging import InferenceLogging, validate_logging
from server.common.invalidation import Announcer, Invalidation, Subject
from server.common.paging import decode_cursor, encode_cursor, page_size
from server.common.rate_limits import RateLimits, validate_rate_limits

log = structlog.get_logger(__name__)

_CODE_ATTEMPTS = 5


class AccountStore(Protocol):
    async def insert_account(self, name: str, email: str, referral_code: str) -> Account: ...
    async def get_account(self, account_id: UUID) -> Account | None: ...
    async def update_account(
        self, account_id: UUID, name: str | None, email: str | None
    ) -> Account | None: ...
    async def disable_account(self, account_id: UUID) -> Account | None: ...
    async def set_account_rate_limits(
        self, account_id: UUID, limits: RateLimits
    ) -> Account | None: ...
    async def set_account_inference_logging(
        self, account_id: UUID, setting: InferenceLogging
    ) -> Account | None: ...
    async def list_accounts(
        self, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Account]: ...
    async def insert_api_key(
        self, account_id: UUID, name: str, key: GeneratedKey, policy: KeyPolicy
    ) -> ApiKey | None: ...
    async def find_active_api_key(self, key_hash: str) -> tuple[ActiveKey, str] | None: ...
    async def get_api_key(self, api_key_id: UUID) -> ApiKey | None: ...
    async def list_api_keys(
        self, account_id: UUID, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[ApiKey]: ...
    async def revoke_api_key(self, api_key_id: UUID) -> ApiKey | None: ...
    async def referral_code(self, account_id: UUID, candidate: str) -> str | None: ...
    async def list_referrals(self, account_id: UUID) -> list[Referral]: ...
    async def referral_rules(self) -> ReferralRules: ...
    async def set_referral_rules(self, rules: ReferralRules) -> ReferralRules: ...


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        hasher: KeyHasher,
        service_token: str,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        changes: Announcer | None = None,
    ) -> None:
        """``changes``: where revoked keys and changed accounts are announced, so that
        every cloud replica drops its cached lookups at once (unset: nobody listens)."""
        self._store = store
        self._changes = changes
        self._hasher = hasher
        self._service_token = service_token
        self._clock = clock

    # callers

    async def principal(self, authorization: str | None) -> Principal:
        """The caller behind ``authorization`` metadata (service token or API key)."""
        return (await self._resolve(authorization))[0]

    async def describe_caller(
        self, authorization: str | None
    ) -> tuple[Principal, Account | None, ApiKey | None]:
        """The caller behind ``authorization`` with its account and key (neither for
        the service token), for a console or CLI to learn whom a key acts for."""
        principal, key = await self._resolve(authorization)
        if key is None:
            return principal, None, None
        account = await self._store.get_account(key.account_id)
        if account is None:
            raise InvalidApiKey("Invalid API key")
        return principal, account, key

    async def _resolve(self, authorization: str | None) -> tuple[Principal, ApiKey | None]:
        credential = bearer_credential(authorization)
        if not looks_like_api_key(credential):
            if self._service_token and is_service_token(credential, self._service_token):
                return Principal.service(), None
            raise InvalidApiKey("Invalid credentials")
        key = (await self._active_key(credential)).api_key
        if Scope.ADMIN in key.policy.scopes:
            return Principal(key.account_id, admin=True), key
        if Scope.MANAGEMENT in key.policy.scopes:
            return Principal(key.account_id, admin=False), key
        raise PermissionDenied("This API key has no management scope")

    async def authenticate_api_key(self, caller: Principal, secret: str) -> ActiveKey:
        """The active key behind ``secret`` (with its account's rate limits); malformed,
        unknown, revoked and expired keys (and keys of disabled accounts) all fail the
        same way. Only the platform's services may ask: anyone else could use this to
        test guessed or stolen keys without ever making a request."""
        caller.require_platform_service("authenticate API keys")
        return await self._active_key(secret)

    async def _active_key(self, secret: str) -> ActiveKey:
        key_hash = self._hasher.hash(validate_api_key(secret))
        found = await self._store.find_active_api_key(key_hash)
        # The index lookup finds the row; the constant-time compare decides.
        if found is None or not self._hasher.matches(secret, found[1]):
            raise InvalidApiKey("Invalid API key")
        return found[0]

    # accounts

    async def create_account(
        self, caller: Principal, name: str, email: str = "", referral_code: str = ""
    ) -> Account:
        caller.require_admin()
        account = await self._store.insert_account(
            validate_name(name), validate_email(email), referral_code.strip().upper()
        )
        log.info(
            "account created",
            account_id=str(account.account_id),
            referred=account.referred_by is not None,
        )
        return account

    async def get_account(self, caller: Principal, account_id: str) -> Account:
        owner = self._access(caller, account_id)
        account = await self._store.get_account(owner)
        if account is None:
            raise NotFound(f"Account {account_id} not found")
        return account

    async def update_account(
        self, caller: Principal, account_id: str, name: str | None, email: str | None
    ) -> Account:
        owner = self._access(caller, account_id)
        account = await self._store.update_account(
            owner,
            None if name is None else validate_name(name),
            None if email is None else validate_email(email),
        )
        if account is None:
            raise NotFound(f"Account {account_id} not found")
        return account

    async def list_accounts(
        self, caller: Principal, requested_size: int, page_token: str
    ) -> tuple[list[Account], str]:
        caller.require_admin()
        limit = page_size(requested_size)
        accounts = await self._store.list_accounts(limit, decode_cursor(page_token))
        last = accounts[-1] if len(accounts) == limit else None
        return accounts, "" if last is None else encode_cursor(last.created_at, last.account_id)

    async def disable_account(self, caller: Principal, account_id: str) -> Account:
        caller.require_admin()
        account = await self._store.disable_account(parse_id(account_id, field="account_id"))
        if account is None:
            raise NotFound(f"Account {account_id} not found")
        log.info("account disabled", account_id=account_id)
        await self._announce(Invalidation(Subject.ACCOUNT, str(account.account_id)))
        return account

    async def set_account_rate_limits(
        self, caller: Principal, account_id: str, limits: RateLimits
    ) -> Account:
        """Admins set an account's limits (its own keys may only narrow them)."""
        caller.require_admin()
        account = await self._store.set_account_rate_limits(
            parse_id(account_id, field="account_id"), validate_rate_limits(limits)
        )
        if account is None:
            raise NotFound(f"Account {account_id} not found")
        log.info("account rate limits set", account_id=account_id, limits=limits)
        await self._announce(Invalidation(Subject.ACCOUNT, str(account.account_id)))
        return account

    async def set_account_inference_logging(
        self, caller: Principal, account_id: str, setting: InferenceLogging
    ) -> Account:
        """The account itself or an admin opts it in to (or out of) inference logs."""
        owner = self._access(caller, account_id)
        account = await self._store.set_account_inference_logging(owner, validate_logging(setting))
        if account is None:
            raise NotFound(f"Account {account_id} not found")
        log.info(
            "account inference logging set",
            account_id=account_id,
            enabled=account.inference_logging.enabled,
            retention_days=account.inference_logging.retention_days,
        )
        # Cloud drops its cached lookups of the account's keys: new requests follow it.
        await self._announce(Invalidation(Subject.ACCOUNT, str(account.account_id)))
        return account

    # API keys

    async def create_api_key(
        self, caller: Principal, account_id: str, name: str, policy: KeyPolicy | None = None
    ) -> IssuedApiKey:
        owner = self._access(caller, account_id)
        policy = validate_policy(policy or KeyPolicy(), self._clock())
        if Scope.ADMIN in policy.scopes:
            caller.require_admin()
        if policy.subcloud_id:
            # The cloud layer checks subcloud membership before it binds a key.
            caller.require_platform_service("bind a key to a subcloud")
        key = self._hasher.generate()
        stored = await self._store.insert_api_key(
            owner, validate_name(name, required=False), key, policy
        )
        if stored is None:
            raise NotFound(f"Account {account_id} not found")
        log.info(
            "api key created",
            account_id=account_id,
            api_key_id=str(stored.api_key_id),
            prefix=stored.prefix,
            scopes=sorted(policy.scopes),
        )
        return IssuedApiKey(api_key=stored, secret=key.secret)

    async def create_node_token(
        self, caller: Principal, account_id: str, name: str
    ) -> IssuedApiKey:
        """A key with only the node scope, for the operator's agents."""
        return await self.create_api_key(
            caller, account_id, name or "node", KeyPolicy(scopes=frozenset({Scope.NODE}))
        )

    async def authenticate_node_token(self, caller: Principal, secret: str) -> ApiKey:
        """The node token behind ``secret``; only the platform's services may ask."""
        caller.require_admin()
        key = (await self._active_key(secret)).api_key
        if Scope.NODE not in key.policy.scopes:
            raise InvalidApiKey("Invalid node token")
        return key

    async def list_api_keys(
        self, caller: Principal, account_id: str, requested_size: int, page_token: str
    ) -> tuple[list[ApiKey], str]:
        owner = self._access(caller, account_id)
        limit = page_size(requested_size)
        keys = await self._store.list_api_keys(owner, limit, decode_cursor(page_token))
        last = keys[-1] if len(keys) == limit else None
        return keys, "" if last is None else encode_cursor(last.created_at, last.api_key_id)

    async def revoke_api_key(self, caller: Principal, api_key_id: str) -> ApiKey:
        key_id = parse_id(api_key_id, field="api_key_id")
        key = await self._store.get_api_key(key_id)
        if key is None:
            raise NotFound(f"API key {api_key_id} not found")
        caller.require_access(key.account_id)
        revoked = await self._store.revoke_api_key(key_id)
        assert revoked is not None  # keys are never deleted
        log.info("api key revoked", api_key_id=api_key_id, prefix=key.prefix)
        await self._announce(Invalidation(Subject.API_KEY, str(key_id)))
        return revoked

    # referrals

    async def referral_code(self, caller: Principal, account_id: str) -> str:
        owner = self._access(caller, account_id)
        for _ in range(_CODE_ATTEMPTS):
            code = await self._store.referral_code(owner, new_referral_code())
            if code is None:
                raise NotFound(f"Account {account_id} not found")
            if code:
                return code
        raise RuntimeError("could not draw an unused referral code")

    async def list_referrals(self, caller: Principal, account_id: str) -> list[Referral]:
        return await self._store.list_referrals(self._access(caller, account_id))

    async def referral_rules(self, caller: Principal) -> ReferralRules:
        return await self._store.referral_rules()

    async def set_referral_rules(self, caller: Principal, rules: ReferralRules) -> ReferralRules:
        caller.require_admin()
        updated = await self._store.set_referral_rules(validate_rules(rules))
        log.info("referral rules updated", rules=str(updated))
        return updated

    async def _announce(self, change: Invalidation) -> None:
        if self._changes is not None:
            await self._changes.announce(change)

    @staticmethod
    def _access(caller: Principal, account_id: str) -> UUID:
        owner = parse_id(account_id, field="account_id")
        caller.require_access(owner)
        return owner
