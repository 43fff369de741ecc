"""What the network keeps in its system of record (PostgreSQL; adapters in
standing_store.py, config_store.py and job_store.py), behind small ports so
that the service stays pure. Every store is scoped to one network id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from core.job_records import JobQuery, JobRecord
from server.network.config import NetworkConfig
from server.network.nodes import NodeStanding


@dataclass(frozen=True, slots=True)
class StandingRecord:
    """A node's standing as stored, with the operator it was last admitted for."""

    node_id: str
    operator_account_id: str
    reputation: float
    failed_canary: bool
    quarantine_reason: str

    @classmethod
    def of(cls, node_id: str, operator_account_id: str, standing: NodeStanding) -> StandingRecord:
        return cls(
            node_id,
            operator_account_id,
            standing.reputation,
            standing.failed_canary,
            standing.quarantine_reason,
        )

    def standing(self) -> NodeStanding:
        return NodeStanding(self.reputation, self.failed_canary, self.quarantine_reason)

    def apply_to(self, standing: NodeStanding) -> None:
        """Makes a connected node's live standing this one (the router reads it)."""
        standing.reputation = self.reputation
        standing.failed_canary = self.failed_canary
        standing.quarantine_reason = self.quarantine_reason


@dataclass(frozen=True, slots=True)
class ConfigAck:
    node_id: str
    version: int
    acked_at: datetime


class StandingStore(Protocol):
    async def load_standing(self, node_id: str) -> StandingRecord | None: ...

    async def save_standings(self, records: Sequence[StandingRecord]) -> None:
        """Inserts or replaces each node's standing."""
        ...


class ConfigStore(Protocol):
    async def latest_config(self) -> NetworkConfig | None:
        """The highest stored version; None before the first."""
        ...

    async def add_config(self, config: NetworkConfig) -> bool:
        """Stores ``config`` under its version; False if that version exists already
        (another replica stored it first)."""
        ...

    async def config_exists(self, version: int) -> bool: ...

    async def catalog_added(self, model_ids: Sequence[str]) -> dict[str, datetime]:
        """When each model entered the catalog; those never seen before enter now."""
        ...

    async def save_acks(self, acks: Sequence[ConfigAck]) -> None: ...

    async def list_acks(self, version: int, after_node_id: str, limit: int) -> list[ConfigAck]:
        """Acknowledgements of ``version`` by node id, from after ``after_node_id``."""
        ...


class JobRecordStore(Protocol):
    async def save_jobs(self, records: Sequence[JobRecord]) -> None:
        """Inserts or replaces each job's record."""
        ...

    async def load_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The stored records of those of ``job_ids`` that have one."""
        ...

    async def list_jobs(
        self, query: JobQuery, limit: int, after: tuple[datetime, str] | None
    ) -> list[JobRecord]:
        """Records matching ``query``, newest first (by creation, then job id), from
        after the (created at, job id) ``after``."""
        ...


@dataclass(frozen=True, slots=True)
class NetworkStores:
    standings: StandingStore
    configs: ConfigStore
    jobs: JobRecordStore
