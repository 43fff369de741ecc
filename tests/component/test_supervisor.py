"""`resultity up` keeps its local agent running: a child that exits is started again."""

from __future__ import annotations

import sys

from agent.backoff import Backoff
from server.supervisor import SupervisedProcess
from tests.harness import eventually

SLEEPER = (sys.executable, "-c", "import time; time.sleep(600)")


async def test_a_killed_child_is_started_again_until_stopped() -> None:
    supervised = SupervisedProcess("sleeper", SLEEPER, {}, backoff=Backoff(0.01, 0.05))
    first = await supervised.start()
    try:
        first.kill()
        await eventually(lambda: supervised.restarts == 1)
        second = supervised.process
        assert second is not None
        assert second.pid != first.pid
        assert second.returncode is None
    finally:
        await supervised.stop()

    assert second.returncode is not None
    assert supervised.restarts == 1


async def test_a_stopped_child_is_not_restarted() -> None:
    supervised = SupervisedProcess("sleeper", SLEEPER, {}, backoff=Backoff(0.01, 0.05))
    await supervised.start()

    await supervised.stop()

    assert supervised.process is not None
    assert supervised.process.returncode is not None
    assert supervised.restarts == 0
