"""The event loop every process runs on (and the tests, tests/conftest.py).

uvloop (libuv) where it exists: the control plane is bound by its event loop
(gRPC completions, socket writes, timers), and uvloop does that loop's own work
in C. uvloop has no Windows build; there the standard loop runs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

new_event_loop: Callable[[], asyncio.AbstractEventLoop]
if sys.platform == "win32":
    new_event_loop = asyncio.new_event_loop
else:
    import uvloop

    new_event_loop = uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` to completion on a new event loop, as asyncio.run does."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
