"""Opaque, cursor-based page tokens: the sort key of the last item returned."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from uuid import UUID

from core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_cursor(created_at: datetime, item_id: UUID | str) -> str:
    raw = f"{created_at.isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, UUID] | None:
    """None for an empty token (the first page)."""
    decoded = decode_text_cursor(token)
    if decoded is None:
        return None
    try:
        return decoded[0], UUID(decoded[1])
    except ValueError:
        raise _invalid() from None


def decode_text_cursor(token: str) -> tuple[datetime, str] | None:
    """As decode_cursor, for items whose ids are any text (job ids)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, separator, item = raw.partition("|")
        if not separator or not item.isprintable():
            raise ValueError("not a cursor")
        moment = datetime.fromisoformat(created)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC), item
    except ValueError:
        raise _invalid() from None


def _invalid() -> InvalidArgument:
    return InvalidArgument("page_token is not valid", field="page_token")
