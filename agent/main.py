"""The agent process: load the runtime, then keep a session with the network."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time

import structlog

from agent.runtime.base import Runtime
from agent.runtime.loader import RuntimeSettings, load_runtime
from agent.runtime.worker import WorkerRuntime
from agent.session import AgentSession, SessionSettings
from agent.telemetry import AgentMetrics

log = structlog.get_logger(__name__)


async def run_agent(
    session_settings: SessionSettings,
    runtime_settings: RuntimeSettings,
    metrics: AgentMetrics | None = None,
) -> None:
    """Loads the runtime in a supervised worker process (agent/runtime/worker.py),
    then serves it (see ``serve``)."""
    log.info(
        "loading model",
        runtime=runtime_settings.runtime,
        model=runtime_settings.model_id,
        region=session_settings.region or None,
    )
    began = time.monotonic()
    runtime = await WorkerRuntime.start(functools.partial(load_runtime, runtime_settings))
    seconds = time.monotonic() - began
    log.info("model loaded", seconds=round(seconds, 2))
    if metrics is not None:
        metrics.model_loaded((model.model for model in runtime.models), seconds)
    await serve(session_settings, runtime, metrics)


async def serve(
    session_settings: SessionSettings, runtime: Runtime, metrics: AgentMetrics | None = None
) -> None:
    """Runs until SIGINT or SIGTERM, then drains: no new jobs, running ones finish
    within the grace period. A second signal stops at once. Closes the runtime.
    ``metrics``: where the agent's jobs are measured (none: not measured)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    session = AgentSession(session_settings, runtime, metrics=metrics)
    if metrics is not None:
        metrics.watch_jobs(session.load)
    task = asyncio.create_task(session.run_forever(), name="agent-session")
    try:
        await stop.wait()
        log.info("agent stopping", grace_s=session_settings.drain_grace_s)
        stop.clear()
        drain = asyncio.create_task(session.drain(), name="agent-drain")
        again = asyncio.create_task(stop.wait())
        await asyncio.wait({drain, again, task}, return_when=asyncio.FIRST_COMPLETED)
        for pending in (drain, again):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runtime.close()
