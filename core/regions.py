"""Region names: what operators declare for their nodes and rules ask for."""

from __future__ import annotations

import re

from core.errors import InvalidArgument

MAX_REGION_LENGTH = 32
_REGION = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


def validate_region(region: str, *, field: str = "region") -> str:
    """``region`` if it is a valid name (lowercase letters, digits, inner dashes)."""
    if len(region) > MAX_REGION_LENGTH or not _REGION.match(region):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_REGION_LENGTH} lowercase letters, digits or inner"
            f" dashes, e.g. 'eu-west' (got {region[:40]!r})",
            field=field,
        )
    return region
