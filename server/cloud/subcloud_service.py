"""Managing subclouds, and resolving a bound key's subcloud on the request path."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol
from uuid import UUID

from core.errors import (
    FailedPrecondition,
    InvalidApiKey,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from core.inference import ModelPrice, NodeRequirements
from server.cloud.auth import CachedAuthenticator
from server.cloud.models import ModelDirectory
from server.cloud.ports import AccountPort, Caller, IssuedKey
from server.cloud.subclouds import (
    Actor,
    Subcloud,
    SubcloudMember,
    SubcloudModel,
    SubcloudRole,
    check_prices,
    require_active,
    require_key_issuer,
    require_manager,
    require_reader,
    rule_operators,
    undercut_models,
    validate_models,
    validate_name,
    validate_rules,
)
from server.common.credentials import bearer_credential, is_service_token
from server.common.inference_logging import LOGGING_OFF, InferenceLogging, validate_logging
from server.common.invalidation import Announcer, Invalidation, Subject
from server.common.paging import decode_cursor, encode_cursor, page_size

_MAX_CACHED = 10_000


class SubcloudStore(Protocol):
    async def insert(
        self,
        subcloud_id: UUID,
        name: str,
        owner_account_id: UUID,
        rules: NodeRequirements,
        models: tuple[SubcloudModel, ...],
        inference_logging: InferenceLogging,
    ) -> Subcloud: ...

    async def get(self, subcloud_id: UUID) -> Subcloud | None: ...

    async def member(self, subcloud_id: UUID, account_id: UUID) -> SubcloudMember | None: ...

    async def page(
        self, member: UUID | None, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Subcloud]: ...

    async def update(
        self,
        subcloud_id: UUID,
        *,
        name: str | None = None,
        rules: NodeRequirements | None = None,
        models: tuple[SubcloudModel, ...] | None = None,
        inference_logging: InferenceLogging | None = None,
    ) -> Subcloud | None: ...

    async def archive(self, subcloud_id: UUID) -> Subcloud | None: ...

    async def put_member(
        self, subcloud_id: UUID, account_id: UUID, role: SubcloudRole
    ) -> SubcloudMember | None: ...

    async def remove_member(self, subcloud_id: UUID, account_id: UUID) -> None: ...

    async def members(self, subcloud_id: UUID) -> list[SubcloudMember]: ...


class SubcloudResolver:
    """The subcloud of a bound key, on the request path, cached for ``ttl_s``."""

    def __init__(self, store: SubcloudStore, *, ttl_s: float = 5.0) -> None:
        self._store = store
        self._ttl_s = ttl_s
        # (subcloud, account) -> (expiry, the subcloud if the account may use it).
        self._bound: dict[tuple[str, str], tuple[float, Subcloud | None]] = {}
        # Bumped by every invalidation: a lookup that overlapped one is not cached.
        self._generation = 0

    async def for_caller(self, caller: Caller) -> Subcloud | None:
        """None for an unbound key.

        A key whose subcloud was archived, or whose account left it, stops
        working: that is an invalid key, not a permission question.
        """
        if not caller.subcloud_id:
            return None
        key = (caller.subcloud_id, caller.account_id)
        now = time.monotonic()
        cached = self._bound.get(key)
        if cached is None or cached[0] <= now:
            generation = self._generation
            subcloud_id, account_id = UUID(caller.subcloud_id), UUID(caller.account_id)
            subcloud = await self._store.get(subcloud_id)
            usable = (
                subcloud is not None
                and subcloud.archived is None
                and await self._store.member(subcloud_id, account_id) is not None
            )
            cached = (now + self._ttl_s, subcloud if usable else None)
            if generation == self._generation:
                if len(self._bound) >= _MAX_CACHED:
                    self._bound = {k: v for k, v in self._bound.items() if v[0] > now}
                self._bound[key] = cached
        if cached[1] is None:
            raise InvalidApiKey("This key's subcloud is archived or no longer includes you")
        return cached[1]

    def invalidate(self, change: Invalidation) -> None:
        if change.subject is Subject.SUBCLOUD:
            self._generation += 1
            self._bound = {key: value for key, value in self._bound.items() if key[0] != change.id}

    def invalidate_all(self) -> None:
        self._generation += 1
        self._bound.clear()


class SubcloudService:
    def __init__(
        self,
        store: SubcloudStore,
        account: AccountPort,
        authenticator: CachedAuthenticator,
        catalog: ModelDirectory,
        resolver: SubcloudResolver,
        *,
        service_token: str,
        changes: Announcer | None = None,
    ) -> None:
        """``changes``: where changes that stop or alter a subcloud's keys are announced
        to every replica (unset: this replica alone)."""
        self._store = store
        self._account = account
        self._authenticator = authenticator
        self._catalog = catalog
        self._resolver = resolver
        self._service_token = service_token
        self._changes = changes

    async def actor(self, authorization: str | None) -> Actor:
        """The service token acts as an admin; API keys need the management or admin scope."""
        credential = bearer_credential(authorization)
        if self._service_token and is_service_token(credential, self._service_token):
            return Actor(None, admin=True)
        caller = await self._authenticator.authenticate(authorization)
        if not (caller.may_manage or caller.admin):
            raise PermissionDenied("Managing subclouds needs a key with the management scope")
        return Actor(UUID(caller.account_id), caller.admin)

    # --- management ----------------------------------------------------------

    async def create(
        self,
        actor: Actor,
        name: str,
        owner: UUID | None,
        rules: NodeRequirements,
        models: Sequence[SubcloudModel],
        inference_logging: InferenceLogging = LOGGING_OFF,
    ) -> Subcloud:
        owner_id = actor.account_or(owner)
        name = validate_name(name)
        rules = validate_rules(rules)
        catalog = await self._catalog_prices()
        offered = _checked_models(models, catalog)
        # The owner is the only member of a new subcloud.
        check_prices(offered, catalog, rules, (owner_id,))
        await self._account.require_account(owner_id)
        return await self._store.insert(
            uuid.uuid4(), name, owner_id, rules, offered, validate_logging(inference_logging)
        )

    async def get(self, actor: Actor, subcloud_id: UUID) -> Subcloud:
        subcloud, _ = await self._access(actor, subcloud_id, require_reader)
        return subcloud

    async def list_page(
        self, actor: Actor, requested_page_size: int, page_token: str
    ) -> tuple[list[Subcloud], str]:
        limit = page_size(requested_page_size)
        member = None if actor.admin else actor.account_or(None)
        listed = await self._store.page(member, limit + 1, decode_cursor(page_token))
        if len(listed) <= limit:
            return listed, ""
        last = listed[limit - 1]
        return listed[:limit], encode_cursor(last.created, last.subcloud_id)

    async def update(
        self,
        actor: Actor,
        subcloud_id: UUID,
        *,
        name: str | None = None,
        rules: NodeRequirements | None = None,
        models: Sequence[SubcloudModel] | None = None,
        inference_logging: InferenceLogging | None = None,
    ) -> Subcloud:
        subcloud, _ = await self._access(actor, subcloud_id, require_manager)
        require_active(subcloud)
        rules = None if rules is None else validate_rules(rules)
        catalog = await self._catalog_prices()
        offered = subcloud.models if models is None else _checked_models(models, catalog)
        members = await self._store.members(subcloud_id)
        check_prices(
            offered,
            catalog,
            subcloud.rules if rules is None else rules,
            (member.account_id for member in members),
        )
        updated = await self._store.update(
            subcloud_id,
            name=None if name is None else validate_name(name),
            rules=rules,
            models=None if models is None else offered,
            inference_logging=(
                None if inference_logging is None else validate_logging(inference_logging)
            ),
        )
        if updated is None:
            raise InvalidArgument("The subcloud is archived", field="subcloud_id")
        await self._changed(subcloud_id)
        return updated

    async def archive(self, actor: Actor, subcloud_id: UUID) -> Subcloud:
        await self._access(actor, subcloud_id, require_manager)
        archived = await self._store.archive(subcloud_id)
        assert archived is not None  # subclouds are never deleted
        await self._changed(subcloud_id)
        return archived

    async def put_member(
        self, actor: Actor, subcloud_id: UUID, account_id: UUID, role: SubcloudRole
    ) -> SubcloudMember:
        if role is SubcloudRole.OWNER:
            raise InvalidArgument("A subcloud has one owner, its creator", field="role")
        subcloud, _ = await self._access(actor, subcloud_id, require_manager)
        require_active(subcloud)
        await self._account.require_account(account_id)
        member = await self._store.put_member(subcloud_id, account_id, role)
        if member is None:
            raise InvalidArgument("The owner's role cannot be changed", field="account_id")
        await self._changed(subcloud_id)
        return member

    async def remove_member(self, actor: Actor, subcloud_id: UUID, account_id: UUID) -> None:
        subcloud, _ = await self._access(actor, subcloud_id, require_manager)
        if account_id == subcloud.owner_account_id:
            raise InvalidArgument("The owner cannot be removed", field="account_id")
        if account_id in rule_operators(subcloud.rules) and undercut_models(
            subcloud.models, await self._catalog_prices()
        ):
            # The member's nodes would go on serving prices below the catalog's.
            raise FailedPrecondition(
                "This member's nodes serve the subcloud's prices below the catalog;"
                " remove the account from rules.operator_account_ids first"
            )
        await self._store.remove_member(subcloud_id, account_id)
        await self._changed(subcloud_id)

    async def members(self, actor: Actor, subcloud_id: UUID) -> list[SubcloudMember]:
        await self._access(actor, subcloud_id, require_reader)
        return await self._store.members(subcloud_id)

    async def issue_key(
        self,
        actor: Actor,
        subcloud_id: UUID,
        *,
        holder: UUID | None,
        name: str,
        expires: datetime | None,
        allowed_models: Sequence[str],
    ) -> IssuedKey:
        """An inference key of a member's account, bound to the subcloud."""
        holder_id = actor.account_or(None) if holder is None else holder
        subcloud, _ = await self._access(
            actor, subcloud_id, lambda who, member: require_key_issuer(who, member, holder_id)
        )
        require_active(subcloud)
        if await self._store.member(subcloud_id, holder_id) is None:
            raise InvalidArgument("The key's account must be a member", field="account_id")
        outside = set(allowed_models) - {offer.model for offer in subcloud.models}
        if outside:
            raise InvalidArgument(
                f"not offered by the subcloud: {', '.join(sorted(outside))}",
                field="allowed_models",
            )
        return await self._account.issue_api_key(
            holder_id,
            name=name,
            expires=expires,
            allowed_models=tuple(allowed_models),
            subcloud_id=str(subcloud_id),
        )

    # --- helpers ---------------------------------------------------------------

    async def _changed(self, subcloud_id: UUID) -> None:
        """Applies here at once, even when the bus is down; on other replicas when the
        bus delivers (within the resolver's TTL at worst)."""
        change = Invalidation(Subject.SUBCLOUD, str(subcloud_id))
        self._resolver.invalidate(change)
        if self._changes is not None:
            await self._changes.announce(change)

    async def _access(
        self,
        actor: Actor,
        subcloud_id: UUID,
        check: _AccessCheck,
    ) -> tuple[Subcloud, SubcloudMember | None]:
        subcloud = await self._store.get(subcloud_id)
        if subcloud is None:
            raise NotFound("No such subcloud")
        member = (
            None
            if actor.account_id is None
            else await self._store.member(subcloud_id, actor.account_id)
        )
        check(actor, member)
        return subcloud, member

    async def _catalog_prices(self) -> dict[str, ModelPrice]:
        return {model.id: model.price for model in await self._catalog.all()}


def _checked_models(
    models: Sequence[SubcloudModel], catalog: Mapping[str, ModelPrice]
) -> tuple[SubcloudModel, ...]:
    offered = validate_models(models)
    unknown = sorted({offer.model for offer in offered} - catalog.keys())
    if unknown:
        raise InvalidArgument(f"not in the network's catalog: {', '.join(unknown)}", field="models")
    return offered


class _AccessCheck(Protocol):
    def __call__(self, actor: Actor, member: SubcloudMember | None) -> None: ...
