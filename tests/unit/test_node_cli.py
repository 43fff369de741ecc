"""`resultity nodes` output and the agent's region setting."""

from __future__ import annotations

import pytest
from resultity.network.v1 import node_admin_service_pb2 as pb

from agent.session import SessionSettings
from core.errors import InvalidArgument
from server.cli import main
from server.common.credentials import generate_service_token
from server.network.cli import node_details, node_table
from tests.harness import free_port


def _node(region: str) -> pb.Node:
    return pb.Node(
        node_id="n1",
        node_name="laptop",
        region=region,
        state=pb.NODE_STATE_READY,
        max_concurrent_jobs=2,
        operator_account_id="op",
        verified=True,
        reputation=1.0,
    )


def test_table_and_details_show_the_region() -> None:
    header, row = node_table([_node("eu-west")], now=0.0).splitlines()
    assert header.split()[:4] == ["NODE", "NAME", "REGION", "STATE"]
    assert row.split()[:4] == ["n1", "laptop", "eu-west", "ready"]
    details = node_details(_node("eu-west"), now=0.0)
    assert "region:        eu-west" in details
    assert "verified:      yes" in details


def test_undeclared_region_shows_as_a_dash() -> None:
    _, row = node_table([_node("")], now=0.0).splitlines()
    assert row.split()[2] == "-"


@pytest.mark.parametrize("region", ["EU", "eu west", "-eu", "x" * 33])
def test_agent_refuses_a_malformed_region(region: str) -> None:
    with pytest.raises(InvalidArgument):
        SessionSettings("127.0.0.1:1", "n", region=region)


def test_agent_and_up_take_a_region_and_refuse_a_malformed_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from server.cli import _parser

    agent = _parser().parse_args(["agent", "--network", "h:1", "--region", "eu-west"])
    assert agent.region == "eu-west"
    assert _parser().parse_args(["agent", "--network", "h:1"]).region == ""
    assert _parser().parse_args(["up", "--agent-region", "us-east"]).agent_region == "us-east"
    with pytest.raises(SystemExit):
        _parser().parse_args(["agent", "--network", "h:1", "--region", "EU West"])
    assert "lowercase letters" in capsys.readouterr().err


def test_a_failed_call_ends_the_cli_with_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RESULTITY_SERVICE_TOKEN", generate_service_token())
    with pytest.raises(SystemExit) as exited:
        main(["nodes", "--network", f"127.0.0.1:{free_port()}", "get", "some-node"])
    assert str(exited.value.code).startswith("error: UNAVAILABLE: ")
