"""The network's durable state as the service uses it: reads go to the stores,
writes go behind (write_behind.py) so that no PostgreSQL round trip sits on a
session's or a job's path, except where an operator's change must be durable
before it is confirmed (quarantine, release, a new configuration version).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from core.job_records import JobQuery, JobRecord
from server.network.config import NetworkConfig
from server.network.job_records import JobJournal
from server.network.nodes import NodeSession, NodeStanding
from server.network.state_ports import ConfigAck, NetworkStores, StandingRecord
from server.network.write_behind import WriteBehind


class NetworkState:
    def __init__(
        self,
        stores: NetworkStores,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._stores = stores
        self._clock = clock
        self._standings: WriteBehind[str, StandingRecord] = WriteBehind(
            "standings", stores.standings.save_standings
        )
        self._acks: WriteBehind[tuple[str, int], ConfigAck] = WriteBehind(
            "config-acks", stores.configs.save_acks
        )
        self._jobs: WriteBehind[str, JobRecord] = WriteBehind("jobs", stores.jobs.save_jobs)
        self.journal = JobJournal(lambda record: self._jobs.put(record.job_id, record), clock=clock)

    def start(self) -> None:
        for writer in (self._standings, self._acks, self._jobs):
            writer.start()

    async def close(self, timeout_s: float) -> None:
        """Writes what is pending, for at most ``timeout_s`` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for writer in (self._standings, self._acks, self._jobs):
            await writer.close(max(0.0, deadline - loop.time()))

    # --- standings ---------------------------------------------------------

    async def standing(self, node_id: str) -> StandingRecord | None:
        """The node's stored standing, including what this replica has yet to write."""
        await self._standings.flush(node_id)
        return await self._stores.standings.load_standing(node_id)

    async def standing_unless_pending(self, node_id: str) -> StandingRecord | None:
        """The node's stored standing; None while this replica has a change of it to
        write (then this replica's is the newer)."""
        if self._standings.pending(node_id):
            return None
        return await self._stores.standings.load_standing(node_id)

    def standing_changed(self, node: NodeSession) -> None:
        self.put_standing(node.node_id, node.operator_account_id, node.standing)

    def put_standing(self, node_id: str, operator_account_id: str, standing: NodeStanding) -> None:
        self._standings.put(node_id, StandingRecord.of(node_id, operator_account_id, standing))

    async def standing_written(self, node_id: str) -> None:
        """Waits until the node's standing as last put is stored."""
        await self._standings.flush(node_id)

    # --- job records ---------------------------------------------------------

    async def job_records(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The stored records of ``job_ids``; this replica's pending ones are written
        first."""
        for job_id in job_ids:
            await self._jobs.flush(job_id)
        return await self._stores.jobs.load_jobs(job_ids)

    async def list_job_records(
        self, query: JobQuery, limit: int, after: tuple[datetime, str] | None
    ) -> list[JobRecord]:
        """Stored records matching ``query``; this replica's pending ones are written
        first."""
        await self._jobs.flush()
        return await self._stores.jobs.list_jobs(query, limit, after)

    # --- configuration -------------------------------------------------------

    async def current_config(self, initial: NetworkConfig) -> NetworkConfig:
        """The stored configuration; ``initial`` becomes version 1 when none is."""
        latest = await self._stores.configs.latest_config()
        if latest is not None:
            return latest
        if await self._stores.configs.add_config(initial):
            return initial
        # Another replica stored the first version meanwhile.
        stored = await self._stores.configs.latest_config()
        if stored is None:
            raise RuntimeError("the network configuration was stored and is gone")
        return stored

    async def latest_config(self) -> NetworkConfig | None:
        return await self._stores.configs.latest_config()

    async def add_config(self, config: NetworkConfig) -> bool:
        return await self._stores.configs.add_config(config)

    async def catalog_added(self, model_ids: Sequence[str]) -> dict[str, datetime]:
        return await self._stores.configs.catalog_added(model_ids)

    async def config_exists(self, version: int) -> bool:
        return await self._stores.configs.config_exists(version)

    def config_acked(self, node_id: str, version: int) -> None:
        self._acks.put((node_id, version), ConfigAck(node_id, version, self._clock()))

    async def config_acks(self, version: int, after_node_id: str, limit: int) -> list[ConfigAck]:
        """Acknowledgements of ``version`` on every replica; this one's are written first."""
        await self._acks.flush()
        return await self._stores.configs.list_acks(version, after_node_id, limit)
