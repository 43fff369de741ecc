"""The agent's heartbeats: load, speed and free memory at the network's interval.

The interval comes with the welcome and with every network configuration; a
new interval takes effect at once (the next heartbeat is one new interval
away), without reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib

import psutil
from resultity.agent.v1 import agent_service_pb2 as pb

from agent.runner import JobRunner
from core.agent_messages import Heartbeat
from core.convert.agent_reports import report_to_pb


class Heartbeats:
    def __init__(
        self,
        outbound: asyncio.Queue[pb.ConnectRequest | None],
        runner: JobRunner,
        interval_s: float,
    ) -> None:
        self._outbound = outbound
        self._runner = runner
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(self.interval_s), name="heartbeats")

    def set_interval(self, interval_s: float) -> None:
        """Beats every ``interval_s`` from now on; no change if it is the current one."""
        if interval_s <= 0 or interval_s == self.interval_s:
            return
        self.interval_s = interval_s
        if self._task is not None:
            self.stop()
            self.start()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self, interval_s: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(interval_s)
                beat = Heartbeat(
                    active_jobs=self._runner.active,
                    queued_jobs=self._runner.queued,
                    recent_tokens_per_second=self._runner.tokens_per_second(),
                    free_memory_bytes=psutil.virtual_memory().available,
                )
                self._outbound.put_nowait(report_to_pb(beat))
