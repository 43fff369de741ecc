"""protobuf Timestamps <-> aware UTC datetimes."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from core.errors import InvalidArgument


def timestamp_to_pb(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def optional_timestamp_to_pb(value: datetime | None) -> Timestamp | None:
    """None (the field left unset) for None."""
    return None if value is None else timestamp_to_pb(value)


def timestamp_from_pb(stamp: Timestamp, *, field: str = "") -> datetime:
    """The time ``stamp`` holds; InvalidArgument naming ``field`` for one out of
    Timestamp's range (years 1 to 9999)."""
    try:
        return stamp.ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field or 'a timestamp'} is out of range", field=field) from None
