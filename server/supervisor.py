"""A child process kept running: restarted with backoff whenever it exits.

``resultity up`` runs its local agent this way: an agent that dies (killed,
out of memory, a bug) comes back on its own instead of leaving the platform
without a node until someone restarts everything. Restarts back off with
jitter (``agent.backoff``); the backoff is reset once a child has stayed up
for ``stable_after_s``, so a crash loop slows down while an occasional crash
is answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping, Sequence

import structlog

from agent.backoff import Backoff

log = structlog.get_logger(__name__)

STOP_GRACE_S = 15.0


class SupervisedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        backoff: Backoff | None = None,
        stable_after_s: float = 60.0,
    ) -> None:
        self._name = name
        self._argv = tuple(argv)
        self._env = dict(env)
        self._backoff = backoff or Backoff()
        self._stable_after_s = stable_after_s
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.process: asyncio.subprocess.Process | None = None
        # Times the child was started again after exiting.
        self.restarts = 0

    async def start(self) -> asyncio.subprocess.Process:
        """Starts the child; it is watched (and restarted) from now on."""
        self.process = await self._spawn()
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self._name}")
        return self.process

    async def stop(self) -> None:
        """SIGTERM (the child drains), then SIGKILL after the grace period."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_GRACE_S):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*self._argv, env=self._env)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            process = self.process
            assert process is not None
            started = loop.time()
            code = await process.wait()
            if self._stopping:
                return
            if loop.time() - started >= self._stable_after_s:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.error(
                "child process exited; restarting",
                child=self._name,
                pid=process.pid,
                code=code,
                delay_s=round(delay, 2),
            )
            await asyncio.sleep(delay)
            self.process = await self._spawn()
            self.restarts += 1
