"""The web console the gateway serves at /console (routes.py)."""

from gateway.console.platform import ConsoleTargets
from gateway.console.routes import console_router

__all__ = ["ConsoleTargets", "console_router"]
