"""Identifiers as they arrive in requests."""

from __future__ import annotations

from uuid import UUID

from core.errors import InvalidArgument


def parse_id(value: str, *, field: str) -> UUID:
    """The UUID in ``value``; InvalidArgument naming ``field`` otherwise."""
    try:
        return UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be a UUID", field=field) from None
