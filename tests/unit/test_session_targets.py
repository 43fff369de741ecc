"""An agent's network replicas: the addresses it tries, in order."""

from __future__ import annotations

import pytest

from agent.session import SessionSettings


def test_several_comma_separated_addresses_are_tried_in_order() -> None:
    settings = SessionSettings(network="10.0.0.1:50061, 10.0.0.2:50062,", node_name="n")
    assert settings.targets == ("10.0.0.1:50061", "10.0.0.2:50062")


def test_one_address_is_the_only_target() -> None:
    assert SessionSettings(network="net:50051", node_name="n").targets == ("net:50051",)


def test_no_address_is_refused() -> None:
    with pytest.raises(ValueError, match="no network address"):
        SessionSettings(network=" , ", node_name="n")
