"""The presence port's contract, held by the in-process adapter (the Redis adapter's
run is tests/integration/test_redis_presence.py)."""

from __future__ import annotations

import pytest

from server.network.presence import InProcessPresence, Presence
from tests.presence_contract import PresenceContract


class TestInProcessPresence(PresenceContract):
    @pytest.fixture
    def presence(self) -> Presence:
        return InProcessPresence()
