"""The console session backend's contract, held by the in-process backend (one
gateway's memory; the Redis backend's run is
tests/integration/test_redis_console_sessions.py)."""

from __future__ import annotations

import pytest

from gateway.console.sessions import MemorySessions, SessionBackend
from tests.console_sessions_contract import SessionBackendContract


class TestMemorySessions(SessionBackendContract):
    @pytest.fixture
    def backend(self) -> MemorySessions:
        return MemorySessions()

    @pytest.fixture
    def other_gateway(self, backend: MemorySessions) -> SessionBackend:
        # In one process, "another gateway" can only share the same memory.
        return backend
