"""Every logged value is bounded, whatever a caller or a node sent."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from uuid import UUID

import pytest
import structlog

from core.logging import MAX_VALUE_LENGTH, configure_logging, plain_values, truncate_values


def test_long_strings_and_containers_are_cut_numbers_kept() -> None:
    event = truncate_values(
        None,
        "info",
        {
            "event": "node registered",
            "name": "n" * 3_000_000,
            "models": ["m" * 1000] * 100,
            "short": "eu-west",
            "count": 10**30,
            "ok": True,
        },
    )

    assert len(event["name"]) < MAX_VALUE_LENGTH + 40
    assert event["name"].startswith("n" * MAX_VALUE_LENGTH)
    assert event["name"].endswith("(3000000 chars)")
    assert len(event["models"]) < MAX_VALUE_LENGTH + 40
    assert (event["short"], event["count"], event["ok"]) == ("eu-west", 10**30, True)


def test_configured_logging_writes_bounded_lines() -> None:
    out = io.StringIO()
    try:
        configure_logging("info")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(out))
        structlog.get_logger("test").info("hostile", model="m" * 3_000_000)
    finally:
        structlog.reset_defaults()

    assert "hostile" in out.getvalue()
    assert len(out.getvalue()) < 2 * MAX_VALUE_LENGTH


class _Scope(StrEnum):
    NODE = "node"


@dataclass(frozen=True)
class _Limits:
    requests: int
    scopes: frozenset[_Scope]


def test_values_are_rendered_as_values_not_python_reprs() -> None:
    event = plain_values(
        None,
        "info",
        {
            "scopes": [_Scope.NODE],
            "limits": _Limits(60, frozenset({_Scope.NODE})),
            "at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            "id": UUID(int=1),
            "path": Path("/tmp/x"),
        },
    )
    assert event == {
        "scopes": ["node"],
        "limits": {"requests": 60, "scopes": ["node"]},
        "at": "2026-01-02T03:04:05+00:00",
        "id": "00000000-0000-0000-0000-000000000001",
        "path": "/tmp/x",
    }


def test_json_logs_are_one_object_a_line_for_every_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    try:
        configure_logging("info", json=True)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(out))
        with structlog.contextvars.bound_contextvars(request_id="r1"):
            structlog.get_logger("test").info("api key created", scopes=[_Scope.NODE])
        logging.getLogger("uvicorn.error").warning("library line")
    finally:
        structlog.reset_defaults()
        configure_logging("info")

    ours = json.loads(out.getvalue())
    assert ours["event"] == "api key created"
    assert (ours["scopes"], ours["request_id"], ours["level"]) == (["node"], "r1", "info")
    [line] = [line for line in capsys.readouterr().err.splitlines() if "library line" in line]
    library = json.loads(line)
    assert (library["event"], library["level"], library["logger"]) == (
        "library line",
        "warning",
        "uvicorn.error",
    )
