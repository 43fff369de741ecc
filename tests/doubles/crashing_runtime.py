"""A scripted runtime that dies or hangs the way native code does, on request.

The last message (or a text completion's prompt) chooses: ``abort`` calls
``os.abort()``, ``segfault`` dereferences a null pointer through ctypes, and
``hang`` reports the job started and then blocks its thread (and so its event
loop) without ever checking for cancellation, as a stuck native call would.
Anything else is generated as by ``ScriptedRuntime``. Meant to run inside the
runtime worker process (``crashing_runtime`` is its factory).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agent.runtime.base import GenerationEvent, GenerationRequest, ModelInfo, Runtime, Started
from tests.doubles.scripted_runtime import ScriptedRuntime

ABORT = "abort"
SEGFAULT = "segfault"
HANG = "hang"


@dataclass
class CrashingRuntime:
    scripted: ScriptedRuntime = field(default_factory=ScriptedRuntime)

    @property
    def models(self) -> list[ModelInfo]:
        return self.scripted.models

    @property
    def slots(self) -> int:
        return self.scripted.slots

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        prompt = request.prompt if request.prompt is not None else request.messages[-1].content
        if prompt == ABORT:
            os.abort()
        if prompt == SEGFAULT:
            ctypes.string_at(0)
        if prompt == HANG:
            yield Started(1)
            _stuck_in_native_code()
        async for event in self.scripted.generate(request):
            yield event

    def cached_prefixes(self) -> tuple[int, ...]:
        return self.scripted.cached_prefixes()

    async def close(self) -> None:
        await self.scripted.close()


def _stuck_in_native_code() -> None:
    # Blocks the worker's event loop on purpose: cancellation cannot reach it.
    time.sleep(3600)


async def crashing_runtime(
    script: str = "", token_delay_s: float = 0.0, cached: tuple[int, ...] = ()
) -> Runtime:
    """The worker's factory (pickled to it: a module-level function); ``cached`` is
    what the runtime reports as its cached conversations."""
    scripted = ScriptedRuntime(token_delay_s=token_delay_s, cached=cached)
    if script:
        scripted.script = script
    return CrashingRuntime(scripted)
