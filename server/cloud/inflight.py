"""Requests in flight, recorded durably so that a replica's death loses no hold.

At admission a request's hold and what settling it takes (its jobs, the model's
prices) are stored under a lease; the replica renews the leases of all its
requests in one write every third of the lease, and deletes a request's row once
its hold is settled. A replica that dies stops renewing: its rows' leases lapse
and any replica settles them from the network's job records (orphans.py).

The rows of settled requests are deleted by the next request's insert, in the
same statement, so that a request costs one write rather than two; when no
request comes within ``forget_within_s`` they are deleted on their own. A
replica dying before that leaves them to the sweeper, whose settlement of an
already settled hold is refused and changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from core.inference import ModelPrice
from server.cloud.ports import HoldRef

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class InFlightRequest:
    hold: HoldRef
    request_id: str
    job_ids: tuple[str, ...]
    model: str
    price: ModelPrice


@dataclass(frozen=True, slots=True)
class Orphan:
    request: InFlightRequest
    # Seconds since a sweeper first took the row.
    orphaned_for_s: float


class InFlightStore(Protocol):
    async def add(
        self,
        request: InFlightRequest,
        replica_id: str,
        lease_s: float,
        forget: Sequence[str] = (),
    ) -> None:
        """Records ``request`` and deletes the rows of ``forget`` in one statement."""
        ...

    async def remove(self, hold_id: str) -> None: ...

    async def renew(self, hold_ids: Sequence[str], lease_s: float) -> None:
        """Extends the leases of ``hold_ids`` to ``lease_s`` from now."""
        ...

    async def claim_lapsed(self, limit: int, claim_s: float) -> list[Orphan]:
        """Up to ``limit`` rows whose lease lapsed, leased for ``claim_s`` to the
        caller (rows another caller is claiming at the same moment are skipped)."""
        ...


@dataclass(slots=True)
class _Forgetting:
    """Settled requests whose rows are still to be deleted, and when they are."""

    hold_ids: list[str]
    deleted: asyncio.Future[None]
    alone: asyncio.TimerHandle  # deletes them on their own if no insert takes them


class InFlightLeases:
    """This replica's requests in flight and their leases."""

    def __init__(
        self, store: InFlightStore, *, lease_s: float, forget_within_s: float = 0.1
    ) -> None:
        self.replica_id = uuid.uuid4().hex
        self._store = store
        self._lease_s = lease_s
        self._forget_within_s = forget_within_s
        self._live: set[str] = set()
        # Records being written, by hold id: a request is forgotten only once written.
        self._writes: dict[str, asyncio.Task[None]] = {}
        self._forgetting: _Forgetting | None = None
        self._deletes: set[asyncio.Task[None]] = set()

    def open(self, request: InFlightRequest) -> None:
        """Records the request; the write runs beside its first job rather than before
        it (a replica dying in that moment leaves the hold to expire, as before)."""
        hold_id = request.hold.hold_id
        self._live.add(hold_id)
        forgetting, self._forgetting = self._forgetting, None
        if forgetting is not None:
            forgetting.alone.cancel()
        self._writes[hold_id] = asyncio.create_task(self._add(request, forgetting))

    async def close(self, hold_id: str) -> None:
        """Forgets a request whose hold is settled (after its record was written);
        returns once its row is deleted."""
        self._live.discard(hold_id)
        written = self._writes.pop(hold_id, None)
        try:
            if written is not None:
                await written
        except Exception:  # the lease lapses; the sweeper's settlement is then a replay
            log.warning("recording a request in flight failed", hold_id=hold_id, exc_info=True)
            return
        forgetting = self._forgetting
        if forgetting is None:
            loop = asyncio.get_running_loop()
            forgetting = self._forgetting = _Forgetting(
                [], loop.create_future(), loop.call_later(self._forget_within_s, self._alone)
            )
        forgetting.hold_ids.append(hold_id)
        await asyncio.shield(forgetting.deleted)

    async def _add(self, request: InFlightRequest, forgetting: _Forgetting | None) -> None:
        if forgetting is None:
            await self._store.add(request, self.replica_id, self._lease_s)
            return
        try:
            await self._store.add(request, self.replica_id, self._lease_s, forgetting.hold_ids)
        except Exception:
            await self._delete(forgetting)
            raise
        finally:
            _resolve(forgetting.deleted)

    def _alone(self) -> None:
        forgetting, self._forgetting = self._forgetting, None
        if forgetting is not None:
            task = asyncio.create_task(self._delete(forgetting))
            self._deletes.add(task)
            task.add_done_callback(self._deletes.discard)

    async def _delete(self, forgetting: _Forgetting) -> None:
        try:
            # Rarely more than one: they are left alone only when requests are sparse.
            for hold_id in forgetting.hold_ids:
                await self._store.remove(hold_id)
        except Exception:  # the leases lapse; the sweeper's settlements are then replays
            log.warning(
                "forgetting settled requests failed", hold_ids=forgetting.hold_ids, exc_info=True
            )
        finally:
            _resolve(forgetting.deleted)

    async def renew_forever(self) -> None:
        """Renews this replica's leases every third of the lease until cancelled."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            if not self._live:
                continue
            try:
                await self._store.renew(sorted(self._live), self._lease_s)
            except Exception:  # the next round tries again, well within the lease
                log.warning("renewing in-flight leases failed", exc_info=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
