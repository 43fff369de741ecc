"""The pure rules of subclouds: validation, who may do what, a request's node rules."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from core.errors import InvalidArgument, NotFound, PermissionDenied
from core.inference import ModelPrice, NodeRequirements
from server.cloud.subclouds import (
    Actor,
    Subcloud,
    SubcloudMember,
    SubcloudModel,
    SubcloudRole,
    check_prices,
    require_key_issuer,
    require_manager,
    require_reader,
    route_requirements,
    validate_models,
    validate_name,
    validate_rules,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OWNER = uuid.uuid4()
OTHER = uuid.uuid4()


def _subcloud(rules: NodeRequirements) -> Subcloud:
    return Subcloud(uuid.uuid4(), "s", OWNER, NOW, rules, (SubcloudModel("m"),))


def _member(account: uuid.UUID, role: SubcloudRole) -> SubcloudMember:
    return SubcloudMember(account, role, NOW)


def test_a_request_region_narrows_the_subcloud_rules() -> None:
    rules = NodeRequirements(
        operator_account_ids=frozenset({str(OTHER)}),
        regions=frozenset({"eu-west", "eu-north"}),
        min_reputation=0.5,
        verified_only=True,
    )
    narrowed = route_requirements(_subcloud(rules), "eu-north")
    assert narrowed == NodeRequirements(
        operator_account_ids=rules.operator_account_ids,
        regions=frozenset({"eu-north"}),
        min_reputation=0.5,
        verified_only=True,
    )
    assert route_requirements(_subcloud(rules), "") == rules
    with pytest.raises(InvalidArgument) as outside:
        route_requirements(_subcloud(rules), "us-east")
    assert outside.value.metadata["field"] == "region"


def test_without_a_subcloud_only_the_region_restricts() -> None:
    assert route_requirements(None, "") == NodeRequirements()
    assert route_requirements(None, "ap-south") == NodeRequirements(regions=frozenset({"ap-south"}))
    with pytest.raises(InvalidArgument):
        route_requirements(None, "Not A Region")


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        (NodeRequirements(regions=frozenset({"-bad"})), "rules.regions"),
        (NodeRequirements(min_reputation=1.5), "rules.min_reputation"),
        (NodeRequirements(operator_account_ids=frozenset({"x"})), "rules.operator_account_ids"),
    ],
)
def test_invalid_rules_name_their_field(rules: NodeRequirements, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_rules(rules)
    assert raised.value.metadata["field"] == field


def test_models_and_names_are_validated() -> None:
    assert validate_name("  research ") == "research"
    with pytest.raises(InvalidArgument):
        validate_name(" ")
    with pytest.raises(InvalidArgument):
        validate_models([SubcloudModel("m"), SubcloudModel("m")])
    with pytest.raises(InvalidArgument):
        validate_models([SubcloudModel("m", ModelPrice(-1, 2))])
    assert validate_models([SubcloudModel("m", ModelPrice(1, 2))]) == (
        SubcloudModel("m", ModelPrice(1, 2)),
    )


def test_outsiders_learn_nothing_members_read_managers_change() -> None:
    outsider = Actor(OTHER, admin=False)
    with pytest.raises(NotFound):
        require_reader(outsider, None)
    member = _member(OTHER, SubcloudRole.MEMBER)
    require_reader(outsider, member)
    with pytest.raises(PermissionDenied):
        require_manager(outsider, member)
    require_manager(outsider, _member(OTHER, SubcloudRole.ADMIN))
    require_manager(Actor(None, admin=True), None)


def test_members_issue_keys_for_themselves_managers_for_anyone() -> None:
    actor = Actor(OTHER, admin=False)
    require_key_issuer(actor, _member(OTHER, SubcloudRole.MEMBER), OTHER)
    with pytest.raises(PermissionDenied):
        require_key_issuer(actor, _member(OTHER, SubcloudRole.MEMBER), OWNER)
    require_key_issuer(actor, _member(OTHER, SubcloudRole.ADMIN), OWNER)


def test_actors_act_for_themselves_unless_admin() -> None:
    assert Actor(OTHER, admin=False).account_or(None) == OTHER
    with pytest.raises(PermissionDenied):
        Actor(OTHER, admin=False).account_or(OWNER)
    assert Actor(None, admin=True).account_or(OWNER) == OWNER
    with pytest.raises(InvalidArgument):
        Actor(None, admin=True).account_or(None)


CATALOG = {"m": ModelPrice(prompt=10, completion=20)}


@pytest.mark.parametrize(
    ("price", "operators", "allowed"),
    [
        (ModelPrice(10, 20), (), True),  # the catalog's price: any node
        (ModelPrice(50, 50), (), True),  # above it: any node
        (None, (), True),
        (ModelPrice(9, 20), (), False),  # below it on public nodes
        (ModelPrice(10, 19), (), False),
        (ModelPrice(0, 0), (OWNER,), True),  # below it on the members' own nodes
        (ModelPrice(0, 0), (OWNER, OTHER), False),  # OTHER is no member
    ],
)
def test_a_price_below_the_catalog_needs_the_members_own_nodes(
    price: ModelPrice | None, operators: tuple[uuid.UUID, ...], allowed: bool
) -> None:
    rules = NodeRequirements(operator_account_ids=frozenset(str(op) for op in operators))
    offers = (SubcloudModel("m", price),)
    if allowed:
        check_prices(offers, CATALOG, rules, (OWNER,))
    else:
        with pytest.raises(InvalidArgument) as raised:
            check_prices(offers, CATALOG, rules, (OWNER,))
        assert raised.value.metadata == {"field": "models.price"}
