"""Identifiers in requests: one parser for every layer."""

from __future__ import annotations

from uuid import UUID

import pytest

from core.errors import InvalidArgument
from core.ids import parse_id


def test_a_uuid_is_parsed() -> None:
    value = "0b7e6c1a-3f5d-4c7e-9a3b-2d1e0f9c8b7a"
    assert parse_id(value, field="account_id") == UUID(value)


@pytest.mark.parametrize("value", ["", "not-a-uuid", "0b7e6c1a"])
def test_anything_else_is_an_invalid_argument_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_id(value, field="subcloud.subcloud_id")
    assert raised.value.metadata == {"field": "subcloud.subcloud_id"}
    assert raised.value.message == "subcloud.subcloud_id must be a UUID"
