"""`resultity up --agent-slots N` and `resultity agent --slots N`: whole numbers from 1."""

from __future__ import annotations

import pydantic
import pytest

from server.cli import _parser
from server.settings import PlatformSettings


def test_up_takes_the_local_agents_slots() -> None:
    assert _parser().parse_args(["up", "--agent-slots", "8"]).agent_slots == 8
    assert _parser().parse_args(["up"]).agent_slots is None  # the setting's default, 4


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
@pytest.mark.parametrize(("command", "option"), [("up", "--agent-slots"), ("agent", "--slots")])
def test_slots_below_one_or_not_whole_are_refused(
    command: str, option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args([command, option, value])
    assert option in capsys.readouterr().err


def test_the_setting_refuses_fewer_than_one_slot() -> None:
    assert PlatformSettings().local_agent_slots == 4
    with pytest.raises(pydantic.ValidationError):
        PlatformSettings(local_agent_slots=0)
