"""The agent's heartbeats: load, speed, free memory and the conversations the
runtime holds, at the network's interval.

The interval comes with the welcome and with every network configuration; a
new interval takes effect at once (the next heartbeat is one new interval
away), without reconnecting.

A beat also goes early when a job ends and the runtime's cached conversations
changed: a chat's next turn (a tool loop's at once, a person's within
seconds) usually comes sooner than the next regular beat, and the network
routes it here only once it knows this node holds its start. Early beats are
at least EARLY_BEAT_GAP_S apart, so a node finishing many jobs a second sends
a few beats, not one per job; a change within the gap goes at its end. A
regular beat does not start that gap: one sent just before the job ended
carried the old conversations, and a tool loop's next turn, arriving within
milliseconds, would otherwise go elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import psutil
from resultity.agent.v1 import agent_service_pb2 as pb

from agent.runner import JobRunner
from core.agent_messages import Heartbeat
from core.convert.agent_reports import report_to_pb
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES

# The least time between two early beats (see above).
EARLY_BEAT_GAP_S = 0.5


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
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        early_at = -math.inf
        advertised: tuple[int, ...] = ()
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                early = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(sent_at + interval_s):
                        await self._cache_changed(advertised)
                        await asyncio.sleep(max(0.0, early_at + EARLY_BEAT_GAP_S - loop.time()))
                        early = True
                advertised = self._send()
                sent_at = loop.time()
                if early:
                    early_at = sent_at

    async def _cache_changed(self, advertised: tuple[int, ...]) -> None:
        """Returns once a job ended and the runtime holds other than ``advertised``."""
        ended = self._runner.job_ended
        while True:
            await ended.wait()
            ended.clear()
            if self._runner.cached_prefixes()[:MAX_ADVERTISED_PREFIXES] != advertised:
                return

    def _send(self) -> tuple[int, ...]:
        """Queues a heartbeat; returns the fingerprints it advertises."""
        cached = self._runner.cached_prefixes()[:MAX_ADVERTISED_PREFIXES]
        beat = Heartbeat(
            active_jobs=self._runner.active,
            queued_jobs=self._runner.queued,
            recent_tokens_per_second=self._runner.tokens_per_second(),
            free_memory_bytes=psutil.virtual_memory().available,
            cached_prefixes=cached,
        )
        self._outbound.put_nowait(report_to_pb(beat))
        return cached
