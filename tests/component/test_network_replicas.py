"""Two network replicas in one process sharing in-process presence (replicas as
processes over Redis: tests/integration/test_replica_failover.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.network.presence import InProcessPresence
from tests.harness import new_network_id
from tests.replica_scenarios import (
    NodeAdminScenarios,
    ReplicaPair,
    ReplicaScenarios,
    replica_pair,
)


class TestReplicasInProcess(ReplicaScenarios, NodeAdminScenarios):
    @pytest.fixture
    async def pair(self, postgres_dsn: str) -> AsyncIterator[ReplicaPair]:
        presence = InProcessPresence()
        async with replica_pair(postgres_dsn, new_network_id(), [presence, presence]) as pair:
            yield pair
