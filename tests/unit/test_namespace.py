"""The names a deployment gives to what it keeps in Redis and RabbitMQ
(core/namespace.py): derived from its namespace, the historical ones by default,
never shared with another namespace; the setting validated where it is read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from core.errors import InvalidArgument
from core.namespace import (
    DEFAULT_NAMESPACE,
    MAX_NAMESPACE_LENGTH,
    AmqpNames,
    RedisNames,
    validate_namespace,
)
from server.account.earnings import CONSUMER as EARNINGS_CONSUMER
from server.account.usage import CONSUMER as USAGE_CONSUMER
from server.cli import _parser
from server.common.bus_memory import MemoryBus
from server.settings import PlatformSettings
from tests.namespace_contract import *  # noqa: F403

# Without a namespace set, a deployment keeps the names it had before there were any.
HISTORICAL_REDIS = {
    "resultity:invalidations",
    "resultity:network:resultity-local:config",
    "resultity:presence:nodes",
    "resultity:presence:changes",
    "resultity:presence:log",
    "resultity:presence:leases",
    "resultity:presence:sessions",
    "resultity:presence:node:n1",
    "resultity:rate:key:k1",
    "resultity:rate:key:k1:flight",
    "resultity:console:session:h1",
}
HISTORICAL_AMQP = {
    "resultity.settlements",
    "resultity.settlements.dead",
    "resultity.ledger",
    "resultity.ledger.consumer-usage",
    "resultity.ledger.operator-earnings",
}


def redis_names(names: RedisNames, part: str) -> set[str]:
    """Every name ``names`` gives, with ``part`` where an id goes."""
    return {
        names.invalidations,
        names.network_channel(part, "config"),
        names.presence_index,
        names.presence_changes,
        names.presence_log,
        names.presence_leases,
        names.presence_sessions,
        names.presence_record(part),
        names.rate_bucket(part),
        names.rate_in_flight(part),
        names.console_session(part),
    }


def amqp_names(names: AmqpNames) -> set[str]:
    return {
        names.settlements,
        names.dead_letter(names.settlements),
        names.ledger_exchange,
        names.ledger_queue(USAGE_CONSUMER),
        names.ledger_queue(EARNINGS_CONSUMER),
    }


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


def test_the_default_namespace_keeps_the_historical_names() -> None:
    redis = RedisNames()
    assert {
        redis.invalidations,
        redis.network_channel("resultity-local", "config"),
        redis.presence_index,
        redis.presence_changes,
        redis.presence_log,
        redis.presence_leases,
        redis.presence_sessions,
        redis.presence_record("n1"),
        redis.rate_bucket("key:k1"),
        redis.rate_in_flight("key:k1"),
        redis.console_session("h1"),
    } == HISTORICAL_REDIS
    assert amqp_names(AmqpNames()) == HISTORICAL_AMQP
    assert RedisNames().namespace == AmqpNames().namespace == DEFAULT_NAMESPACE


def test_another_namespace_renames_everything() -> None:
    redis = redis_names(RedisNames("staging"), "x")
    assert all(name.startswith("staging:") for name in redis)
    assert RedisNames("staging").presence_record("n1") == "staging:presence:node:n1"
    amqp = amqp_names(AmqpNames("staging"))
    assert all(name.startswith("staging.") for name in amqp)
    assert AmqpNames("staging").settlements == "staging.settlements"


_NAMESPACES = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)


@given(first=_NAMESPACES, second=_NAMESPACES, part=st.text(max_size=20))
def test_two_namespaces_share_no_name(first: str, second: str, part: str) -> None:
    """Whatever the ids in them (separators included): a namespace's names all begin
    with it and a separator it cannot hold."""
    if first == second:
        return
    assert not redis_names(RedisNames(first), part) & redis_names(RedisNames(second), part)
    assert not amqp_names(AmqpNames(first)) & amqp_names(AmqpNames(second))


@pytest.mark.parametrize(
    "namespace", ["staging", "prod-eu_1", "a", "0", "x" * MAX_NAMESPACE_LENGTH]
)
def test_a_valid_namespace_is_accepted(namespace: str) -> None:
    assert validate_namespace(namespace) == namespace
    assert RedisNames(namespace).namespace == AmqpNames(namespace).namespace == namespace


@pytest.mark.parametrize(
    "namespace",
    ["", "Staging", "a.b", "a:b", "-a", "_a", "a b", "a/b", "é", "x" * (MAX_NAMESPACE_LENGTH + 1)],
)
def test_an_invalid_namespace_is_refused_clearly(namespace: str) -> None:
    with pytest.raises(InvalidArgument, match="namespace must be") as error:
        validate_namespace(namespace)
    assert error.value.metadata == {"field": "namespace"}
    with pytest.raises(InvalidArgument):
        RedisNames(namespace)
    with pytest.raises(InvalidArgument):
        AmqpNames(namespace)


_COMMANDS = (
    ["up"],
    ["network"],
    ["account"],
    ["cloud", "--account", "a:1", "--network", "n:1"],
    ["gateway", "--cloud", "c:1"],
)


@pytest.mark.parametrize("command", _COMMANDS, ids=lambda command: command[0])
def test_every_command_that_connects_takes_a_namespace(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESULTITY_NAMESPACE", raising=False)
    assert _parser().parse_args(command).namespace == DEFAULT_NAMESPACE
    assert _parser().parse_args([*command, "--namespace", "staging"]).namespace == "staging"
    monkeypatch.setenv("RESULTITY_NAMESPACE", "from-env")
    assert _parser().parse_args(command).namespace == "from-env"


@pytest.mark.parametrize("command", _COMMANDS, ids=lambda command: command[0])
def test_an_invalid_namespace_stops_the_command_with_its_reason(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESULTITY_NAMESPACE", raising=False)
    with pytest.raises(SystemExit):
        _parser().parse_args([*command, "--namespace", "prod.eu"])
    assert "argument --namespace: namespace must be" in capsys.readouterr().err
    monkeypatch.setenv("RESULTITY_NAMESPACE", "Prod")
    with pytest.raises(SystemExit):
        _parser().parse_args(command)
    assert "namespace must be" in capsys.readouterr().err


def test_the_platform_settings_read_and_validate_the_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RESULTITY_NAMESPACE", raising=False)
    assert PlatformSettings().namespace == DEFAULT_NAMESPACE
    monkeypatch.setenv("RESULTITY_NAMESPACE", "staging")
    assert PlatformSettings().namespace == "staging"
    monkeypatch.setenv("RESULTITY_NAMESPACE", "prod:eu")
    with pytest.raises(ValidationError, match="namespace must be"):
        PlatformSettings()
