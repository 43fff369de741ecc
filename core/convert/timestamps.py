"""protobuf Timestamps <-> aware UTC datetimes."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp_to_pb(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def optional_timestamp_to_pb(value: datetime | None) -> Timestamp | None:
    """None (the field left unset) for None."""
    return None if value is None else timestamp_to_pb(value)


def timestamp_from_pb(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(UTC)
