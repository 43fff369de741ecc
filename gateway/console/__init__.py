"""The web console the gateway serves at /console (routes.py)."""

from core.namespace import RedisNames
from gateway.console.platform import ConsoleTargets
from gateway.console.routes import console_router
from gateway.console.sessions import SessionStore
from gateway.console.sessions_redis import RedisSessions


def console_sessions(redis_url: str | None, names: RedisNames) -> SessionStore | None:
    """Sessions in Redis at ``redis_url`` under ``names`` (any gateway replica serves
    any browser), or None: in each gateway's memory."""
    return None if not redis_url else SessionStore(RedisSessions.from_url(redis_url, names))


__all__ = ["ConsoleTargets", "console_router", "console_sessions"]
