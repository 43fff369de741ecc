"""The agent process: load the runtime, then keep a session with the network."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from agent.runtime.loader import RuntimeSettings, load_runtime
from agent.session import AgentSession, SessionSettings

log = structlog.get_logger(__name__)


async def run_agent(session_settings: SessionSettings, runtime_settings: RuntimeSettings) -> None:
    """Runs until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    log.info("loading model", runtime=runtime_settings.runtime, model=runtime_settings.model_id)
    runtime = await load_runtime(runtime_settings)
    session = AgentSession(session_settings, runtime)
    task = asyncio.create_task(session.run_forever(), name="agent-session")
    try:
        await stop.wait()
        log.info("agent stopping")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runtime.close()
