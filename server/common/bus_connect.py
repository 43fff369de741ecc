"""Choosing the fan-out bus (bus.py) from the configuration."""

from __future__ import annotations

from server.common.bus import Bus


def connect_bus(redis_url: str | None) -> Bus:
    """Redis pub/sub at ``redis_url``; without one, a bus for this process alone."""
    if redis_url:
        from server.common.bus_redis import RedisBus

        return RedisBus(redis_url)
    from server.common.bus_memory import MemoryBus

    return MemoryBus()
