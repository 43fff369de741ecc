"""Runs the gateway app with uvicorn inside the caller's event loop.

The caller (the platform composer or the CLI) owns signals and decides when to
stop by cancelling the task; uvicorn's own signal capture is bypassed.
"""

from __future__ import annotations

import asyncio

import structlog
import uvicorn
from fastapi import FastAPI

log = structlog.get_logger("gateway")

# Open streams get this long to finish on shutdown before their tasks are cancelled
# (which cancels their cloud calls).
GRACEFUL_SHUTDOWN_S = 5


async def serve(
    app: FastAPI, host: str, port: int, *, started: asyncio.Event | None = None
) -> None:
    """Serves `app` on host:port until cancelled, then shuts down gracefully."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        http="httptools",  # C parser; h11 (pure Python) costs more per request
        log_config=None,  # keep the process's logging set-up
        access_log=False,  # the app logs each request with its request id
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    # Server.serve() would install signal handlers; drive its phases directly instead.
    config.load()
    server.lifespan = config.lifespan_class(config)
    try:
        await server.startup()
    except SystemExit as exit_:
        # uvicorn exits the process when it cannot bind or the lifespan fails.
        raise RuntimeError(f"gateway failed to start on {host}:{port}") from exit_
    log.info("gateway.listening", host=host, port=port)
    if started is not None:
        started.set()
    try:
        await server.main_loop()
    finally:
        server.should_exit = True
        await server.shutdown()
        log.info("gateway.stopped")
