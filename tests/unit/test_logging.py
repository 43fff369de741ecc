"""Every logged value is bounded, whatever a caller or a node sent."""

from __future__ import annotations

import io

import structlog

from core.logging import MAX_VALUE_LENGTH, configure_logging, truncate_values


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
