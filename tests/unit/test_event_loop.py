"""The process's event loop runs with the collector's youngest generation enlarged,
and leaves the thresholds as it found them."""

from __future__ import annotations

import gc

from core import event_loop


def test_run_enlarges_the_youngest_generation_while_it_runs() -> None:
    before = gc.get_threshold()

    async def thresholds() -> tuple[int, ...]:
        return gc.get_threshold()

    assert event_loop.run(thresholds()) == (event_loop.YOUNG_OBJECTS, *before[1:])
    assert gc.get_threshold() == before
