"""The event loop every process runs on (and the tests, tests/conftest.py).

uvloop (libuv) where it exists: the control plane is bound by its event loop
(gRPC completions, socket writes, timers), and uvloop does that loop's own work
in C. uvloop has no Windows build; there the standard loop runs.

While it runs, the cyclic garbage collector's youngest generation holds
``YOUNG_OBJECTS`` objects rather than 700. A request's objects live for
milliseconds: a collection every 700 allocations finds many of them alive and
promotes them, and the promoted ones soon set off full collections that walk the
whole heap (tens of milliseconds each, several a minute under load). With the
larger generation they mostly die before a collection sees them: in
``python -m bench.gateway`` the collector's time fell to about a third.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

YOUNG_OBJECTS = 10_000

new_event_loop: Callable[[], asyncio.AbstractEventLoop]
if sys.platform == "win32":
    new_event_loop = asyncio.new_event_loop
else:
    import uvloop

    new_event_loop = uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` to completion on a new event loop, as asyncio.run does, with the
    collector's youngest generation enlarged; its thresholds are restored after."""
    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS, *thresholds[1:])
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(main)
    finally:
        gc.set_threshold(*thresholds)
