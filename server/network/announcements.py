"""What one network replica announces to the others over the fan-out bus
(server/common/bus.py), followed by server/common/channel_follower.py.

An announcement only says that something changed (a configuration version, a
node's standing); each replica reads the change itself from PostgreSQL, and
catches up from the store after resubscribing and every 30 s: a missed
announcement then delays a change, never loses it. The channels are named by
``RedisNames.network_channel`` (core/namespace.py).
"""

from __future__ import annotations

import structlog

log = structlog.get_logger(__name__)


def version_of(message: bytes) -> int:
    """A configuration announcement's version; 0 if unreadable."""
    try:
        return int(message)
    except ValueError:
        log.warning("unreadable configuration announcement", message=message[:64])
        return 0
