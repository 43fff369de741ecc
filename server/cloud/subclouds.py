"""Subclouds: private inference environments, and who may do what with them.

A subcloud offers some of the catalog's models at its own prices and limits
the nodes its requests may run on (``NodeRequirements``). Its owner created
it; members use it through keys bound to it; admins (the owner, members with
the admin role, platform admins) change it. Everything here is pure: the
store and the service around it live in subcloud_store.py and
subcloud_service.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from core.errors import InvalidArgument, NotFound, PermissionDenied
from core.ids import parse_id
from core.inference import ModelPrice, NodeRequirements
from core.regions import validate_region
from server.common.inference_logging import LOGGING_OFF, InferenceLogging

MAX_NAME_LENGTH = 100
MAX_MODELS = 100
MAX_MODEL_ID_LENGTH = 200
MAX_REGIONS = 32
MAX_OPERATORS = 1_000


class SubcloudRole(StrEnum):
    MEMBER = "member"
    ADMIN = "admin"
    OWNER = "owner"

    @property
    def manages(self) -> bool:
        return self is not SubcloudRole.MEMBER


@dataclass(frozen=True, slots=True)
class SubcloudModel:
    model: str
    # None: the catalog's price.
    price: ModelPrice | None = None


@dataclass(frozen=True, slots=True)
class Subcloud:
    subcloud_id: UUID
    name: str
    owner_account_id: UUID
    created: datetime
    rules: NodeRequirements
    models: tuple[SubcloudModel, ...]
    archived: datetime | None = None
    # Whether its keys' requests are logged (for accounts that opted in too).
    inference_logging: InferenceLogging = LOGGING_OFF

    def offering(self, model: str) -> SubcloudModel | None:
        return next((offer for offer in self.models if offer.model == model), None)


@dataclass(frozen=True, slots=True)
class SubcloudMember:
    account_id: UUID
    role: SubcloudRole
    added: datetime


@dataclass(frozen=True, slots=True)
class Actor:
    """Who calls the subcloud API: an account's management key, or an admin."""

    account_id: UUID | None
    admin: bool

    def account_or(self, requested: UUID | None) -> UUID:
        """``requested`` if the actor may act for it, else the actor's own account."""
        if requested is not None and requested != self.account_id:
            if not self.admin:
                raise PermissionDenied("You may only act for your own account")
            return requested
        if self.account_id is None:
            raise InvalidArgument("Name the account to act for", field="account_id")
        return self.account_id


def require_reader(actor: Actor, member: SubcloudMember | None) -> None:
    """Members and platform admins may read a subcloud; others learn nothing of it."""
    if member is None and not actor.admin:
        raise NotFound("No such subcloud")


def require_manager(actor: Actor, member: SubcloudMember | None) -> None:
    require_reader(actor, member)
    if not actor.admin and (member is None or not member.role.manages):
        raise PermissionDenied("Only the subcloud's owner and admins may change it")


def require_key_issuer(actor: Actor, member: SubcloudMember | None, holder: UUID) -> None:
    """Members issue keys for themselves; managers for any member."""
    require_reader(actor, member)
    if actor.admin or actor.account_id == holder:
        return
    if member is None or not member.role.manages:
        raise PermissionDenied("Members may only issue keys for their own account")


def require_active(subcloud: Subcloud) -> None:
    if subcloud.archived is not None:
        raise InvalidArgument("The subcloud is archived", field="subcloud_id")


def validate_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"name must be 1-{MAX_NAME_LENGTH} characters", field="name")
    return name


def validate_rules(rules: NodeRequirements) -> NodeRequirements:
    if len(rules.regions) > MAX_REGIONS:
        raise InvalidArgument(f"at most {MAX_REGIONS} regions", field="rules.regions")
    for region in rules.regions:
        validate_region(region, field="rules.regions")
    if len(rules.operator_account_ids) > MAX_OPERATORS:
        raise InvalidArgument(
            f"at most {MAX_OPERATORS} operators", field="rules.operator_account_ids"
        )
    for operator in rules.operator_account_ids:
        parse_id(operator, field="rules.operator_account_ids")
    if not 0.0 <= rules.min_reputation <= 1.0:
        raise InvalidArgument(
            "rules.min_reputation must be between 0 and 1", field="rules.min_reputation"
        )
    return rules


def validate_models(models: Iterable[SubcloudModel]) -> tuple[SubcloudModel, ...]:
    offered = tuple(models)
    if len(offered) > MAX_MODELS:
        raise InvalidArgument(f"at most {MAX_MODELS} models", field="models")
    seen: set[str] = set()
    for offer in offered:
        if not offer.model or len(offer.model) > MAX_MODEL_ID_LENGTH:
            raise InvalidArgument("models[].model must name a model", field="models.model")
        if offer.model in seen:
            raise InvalidArgument(f"model '{offer.model}' is listed twice", field="models")
        seen.add(offer.model)
        price = offer.price
        if price is not None and min(price.prompt, price.completion) < 0:
            raise InvalidArgument("prices must not be negative", field="models.price")
    return offered


def undercut_models(
    models: Iterable[SubcloudModel], catalog: Mapping[str, ModelPrice]
) -> list[str]:
    """The models offered below the catalog's price (either per-token price)."""
    return sorted(
        offer.model
        for offer in models
        if offer.price is not None
        and offer.model in catalog
        and (
            offer.price.prompt < catalog[offer.model].prompt
            or offer.price.completion < catalog[offer.model].completion
        )
    )


def rule_operators(rules: NodeRequirements) -> set[UUID]:
    """The operator accounts the rules restrict nodes to (none: any operator)."""
    return {
        parse_id(operator, field="rules.operator_account_ids")
        for operator in rules.operator_account_ids
    }


def check_prices(
    models: Iterable[SubcloudModel],
    catalog: Mapping[str, ModelPrice],
    rules: NodeRequirements,
    members: Iterable[UUID],
) -> None:
    """A subcloud may sell a model below the catalog's price only on its own members'
    nodes: public operators are paid a share of what a request is billed, so a price
    they never agreed to must never run on their nodes. The rules must then name
    operator accounts, all of them members."""
    undercut = undercut_models(models, catalog)
    if not undercut:
        return
    operators = rule_operators(rules)
    if not operators or not operators <= set(members):
        raise InvalidArgument(
            f"{', '.join(undercut[:5])} priced below the catalog: allowed only when"
            " rules.operator_account_ids names only the subcloud's own members, whose"
            " nodes then serve it",
            field="models.price",
        )


def route_requirements(subcloud: Subcloud | None, region: str) -> NodeRequirements:
    """The node rules of a request: its subcloud's, narrowed to ``region`` if it asks.

    A region the subcloud's rules exclude cannot be served: that is the
    caller's mistake, so it is an invalid argument rather than no capacity.
    """
    rules = subcloud.rules if subcloud is not None else NodeRequirements()
    if not region:
        return rules
    validate_region(region)
    if rules.regions and region not in rules.regions:
        raise InvalidArgument(
            f"region '{region}' is outside this subcloud's regions", field="region"
        )
    return NodeRequirements(
        operator_account_ids=rules.operator_account_ids,
        regions=frozenset({region}),
        min_reputation=rules.min_reputation,
        verified_only=rules.verified_only,
    )
