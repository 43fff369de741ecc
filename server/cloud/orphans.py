"""Settling the holds of requests whose replica died (their lease lapsed).

Every replica sweeps: it takes lapsed rows (SKIP LOCKED, so replicas take
different ones), reads the network's records of their jobs, and settles each hold
as the request's own replica would have: capture what the network relayed at the
prices of admission, credit the operators of the nodes that ran the jobs; no
record (no job started) captures nothing. The settlement is the one message of
the normal path (``settle:<hold id>``): a replica that was only slow and settles
too is a replay or a refusal, never a second charge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from core.inference import Usage
from server.cloud.inflight import InFlightRequest, InFlightStore, Orphan
from server.cloud.ports import NetworkPort, RelayedJob, SettlementPort
from server.cloud.pricing import cost
from server.cloud.settlement import operator_shares
from server.common.settlements import Settlement, is_refusal

log = structlog.get_logger(__name__)

# Orphans one sweep takes.
SWEEP_BATCH = 100


def orphan_settlement(request: InFlightRequest, jobs: Sequence[RelayedJob]) -> Settlement:
    """The settlement of ``request``'s hold from the records of its jobs."""
    usage = Usage(
        sum(job.usage.prompt_tokens for job in jobs),
        sum(job.usage.completion_tokens for job in jobs),
    )
    shares = [share for job in jobs for share in job.node_usage()]
    return Settlement(
        request.hold.hold_id,
        min(cost(request.price, usage), request.hold.amount),
        operator_shares(request.model, shares, usage),
    )


class OrphanSweeper:
    def __init__(
        self,
        store: InFlightStore,
        network: NetworkPort,
        settler: SettlementPort,
        *,
        claim_s: float,
        running_grace_s: float,
    ) -> None:
        """A taken orphan is the sweeper's for ``claim_s`` (then any replica's again). A
        job still recorded as running is waited for (the network writes its end shortly
        after the caller goes) for ``running_grace_s``, then settled as recorded."""
        self._store = store
        self._network = network
        self._settler = settler
        self._claim_s = claim_s
        self._running_grace_s = running_grace_s

    async def sweep(self) -> int:
        """Settles the orphans that can be settled now; returns how many."""
        settled = 0
        for orphan in await self._store.claim_lapsed(SWEEP_BATCH, self._claim_s):
            request = orphan.request
            bound = log.bind(hold_id=request.hold.hold_id, request_id=request.request_id)
            try:
                settled += await self._settle(orphan, bound)
            except Exception:  # its claim lapses and a later sweep tries again
                bound.warning("settling an orphaned request failed", exc_info=True)
        return settled

    async def sweep_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.warning("sweeping orphaned requests failed", exc_info=True)
            await asyncio.sleep(interval_s)

    async def _settle(self, orphan: Orphan, bound: structlog.typing.FilteringBoundLogger) -> int:
        request = orphan.request
        jobs = await self._network.job_records(request.job_ids)
        if not all(job.ended for job in jobs) and orphan.orphaned_for_s < self._running_grace_s:
            return 0
        settlement = orphan_settlement(request, jobs)
        try:
            charged = await self._settler.settle(settlement)
        except Exception as error:
            if not is_refusal(error):
                raise
            # Resolved already (settled by its slow replica, or expired): nothing to do.
            bound.warning("orphaned request's hold refused", error=str(error))
            charged = 0
        await self._store.remove(request.hold.hold_id)
        bound.info("orphaned request settled", charged=charged, jobs=len(jobs))
        return 1
