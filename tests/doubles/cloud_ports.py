"""In-memory account and network ports for testing the cloud's InferenceService without
gRPC, a database or nodes.

``FakeAccount`` keeps each account's available credits and its holds, refuses a hold
the credits do not cover (InsufficientQuota) and records every settlement.
``FakeNetwork`` runs each job from a script the test queues: job events, an exception
to raise (a failed node), or ``STALL`` (the node goes quiet until the job is cancelled);
it records every job and whether its stream was closed. ``InMemoryInFlight`` holds the
requests in flight that a replica leases (inflight.InFlightStore);
``InMemoryInferenceLogs`` the inference logs (inference_logs.InferenceLogStore), and
fails every write while ``failing`` is set.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final
from uuid import UUID

from core.errors import (
    HoldAlreadyResolved,
    InsufficientQuota,
    InvalidApiKey,
    InvalidArgument,
    NotFound,
)
from core.inference import (
    NO_ORIGIN,
    CatalogModel,
    FinishReason,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobEvent,
    JobFinished,
    JobOrigin,
    NodeRequirements,
    NodeUsage,
    Usage,
)
from server.cloud.inference_logs import InferenceLog
from server.cloud.inflight import InFlightRequest, Orphan
from server.cloud.ports import (
    NO_REQUIREMENTS,
    Caller,
    HoldRef,
    IssuedKey,
    OperatorShares,
    RelayedJob,
)
from server.common.inference_logging import LOGGING_OFF, InferenceLogging


@dataclass(frozen=True)
class Settlement:
    hold_id: str
    capture: int
    shares: OperatorShares


@dataclass
class _Hold:
    account_id: str
    amount: int
    settled: bool = False


class FakeAccount:
    """AccountPort over dictionaries. ``settle_gate``, when set by the test, holds every
    settlement until it opens (``settling`` is set once one is waiting)."""

    def __init__(self) -> None:
        self.callers: dict[str, Caller] = {}
        self.available: dict[str, int] = {}
        self.holds: dict[str, _Hold] = {}
        self.settlements: list[Settlement] = []
        self.settle_gate: asyncio.Event | None = None
        self.settling = asyncio.Event()

    def add_customer(
        self, secret: str, credits: int, logging: InferenceLogging = LOGGING_OFF
    ) -> Caller:
        """An account with ``credits`` (and ``logging`` as its inference log setting) and
        an inference key ``secret``."""
        caller = Caller(str(uuid.uuid4()), f"key-{len(self.callers)}", inference_logging=logging)
        self.callers[secret] = caller
        self.available[caller.account_id] = credits
        return caller

    async def authenticate(self, secret: str) -> Caller:
        try:
            return self.callers[secret]
        except KeyError:
            raise InvalidApiKey("Invalid API key") from None

    async def require_account(self, account_id: UUID) -> None:
        if str(account_id) not in self.available:
            raise NotFound(f"Account {account_id} not found")

    async def issue_api_key(
        self,
        account_id: UUID,
        *,
        name: str,
        expires: datetime | None,
        allowed_models: tuple[str, ...],
        subcloud_id: str,
    ) -> IssuedKey:
        await self.require_account(account_id)
        secret = f"sk-{uuid.uuid4().hex}"
        caller = Caller(
            str(account_id),
            f"key-{len(self.callers)}",
            allowed_models=frozenset(allowed_models),
            subcloud_id=subcloud_id,
        )
        self.callers[secret] = caller
        return IssuedKey(caller.api_key_id, caller.account_id, secret[:7], secret)

    async def create_hold(
        self, account_id: str, amount: int, *, idempotency_key: str, expires: datetime
    ) -> HoldRef:
        if amount > self.available[account_id]:
            raise InsufficientQuota("You exceeded your current quota")
        self.available[account_id] -= amount
        hold_id = str(uuid.uuid4())
        self.holds[hold_id] = _Hold(account_id, amount)
        return HoldRef(hold_id, amount)

    async def settle_hold(self, hold_id: str, capture: int, shares: OperatorShares) -> int:
        if self.settle_gate is not None:
            self.settling.set()
            await self.settle_gate.wait()
        hold = self.holds[hold_id]
        if hold.settled:
            raise HoldAlreadyResolved("The hold is already settled")
        if not 0 <= capture <= hold.amount:
            raise InvalidArgument("capture exceeds the hold", field="capture_micro_credits")
        hold.settled = True
        self.available[hold.account_id] += hold.amount - capture
        self.settlements.append(Settlement(hold_id, capture, shares))
        return capture


@dataclass
class _Lease:
    request: InFlightRequest
    until: float
    claimed_at: float | None = None


class InMemoryInFlight:
    """InFlightStore over a dictionary, leases on the monotonic clock."""

    def __init__(self) -> None:
        self.requests: dict[str, _Lease] = {}

    async def add(
        self,
        request: InFlightRequest,
        replica_id: str,
        lease_s: float,
        forget: Sequence[str] = (),
    ) -> None:
        for hold_id in forget:
            self.requests.pop(hold_id, None)
        self.requests[request.hold.hold_id] = _Lease(request, time.monotonic() + lease_s)

    async def remove(self, hold_id: str) -> None:
        self.requests.pop(hold_id, None)

    async def renew(self, hold_ids: Sequence[str], lease_s: float) -> None:
        for hold_id in hold_ids:
            if hold_id in self.requests:
                self.requests[hold_id].until = time.monotonic() + lease_s

    async def claim_lapsed(self, limit: int, claim_s: float) -> list[Orphan]:
        now = time.monotonic()
        lapsed = [lease for lease in self.requests.values() if lease.until <= now][:limit]
        for lease in lapsed:
            lease.until = now + claim_s
            lease.claimed_at = now if lease.claimed_at is None else lease.claimed_at
        return [Orphan(lease.request, now - (lease.claimed_at or now)) for lease in lapsed]


class InMemoryInferenceLogs:
    def __init__(self) -> None:
        self.entries: dict[str, InferenceLog] = {}
        self.failing = False
        # Writes attempted (failed or not), for tests that wait for the writer.
        self.writes = 0

    async def add(self, entries: Sequence[InferenceLog]) -> None:
        self.writes += 1
        if self.failing:
            raise ConnectionError("the database is down")
        for entry in entries:
            self.entries.setdefault(entry.log_id, entry)

    async def for_job(self, job_id: str) -> InferenceLog | None:
        return next((e for e in self.entries.values() if job_id in e.job_ids), None)

    async def delete_expired(self, now: datetime, limit: int) -> int:
        expired = [key for key, e in self.entries.items() if e.expires_at <= now][:limit]
        for key in expired:
            del self.entries[key]
        return len(expired)


class _Stall:
    """A script step: the node sends nothing more until the job is cancelled."""


STALL: Final = _Stall()

ScriptStep = JobEvent | BaseException | _Stall


@dataclass
class RunJob:
    job_id: str
    spec: GenerationSpec
    requirements: NodeRequirements
    origin: JobOrigin
    closed: bool = False
    # What the network relayed, as its job record tells it.
    usage: Usage = field(default_factory=Usage)
    nodes: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False

    def relayed(self, event: JobEvent) -> None:
        if isinstance(event, JobAssigned):
            self.nodes.append((event.node_id, ""))
        elif isinstance(event, JobDelta):
            prompt = event.prompt_tokens or self.usage.prompt_tokens
            self.usage = Usage(prompt, self.usage.completion_tokens + event.token_count)
        elif isinstance(event, JobFinished):
            operators = {share.node_id: share.operator_account_id for share in event.node_usage}
            self.nodes = [(node, operators.get(node, "")) for node, _ in self.nodes]
            self.ended = True


@dataclass
class FakeNetwork:
    """NetworkPort whose jobs follow the scripts in ``scripts``, one per job, in order."""

    models: list[CatalogModel]
    scripts: deque[Sequence[ScriptStep]] = field(default_factory=deque)
    jobs: list[RunJob] = field(default_factory=list)

    async def list_models(
        self, requirements: NodeRequirements = NO_REQUIREMENTS
    ) -> list[CatalogModel]:
        return list(self.models)

    async def job_records(self, job_ids: Sequence[str]) -> list[RelayedJob]:
        wanted = set(job_ids)
        return [
            RelayedJob(job.job_id, job.usage, tuple(job.nodes), job.ended)
            for job in self.jobs
            if job.job_id in wanted
        ]

    async def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
        origin: JobOrigin = NO_ORIGIN,
    ) -> AsyncGenerator[list[JobEvent], None]:
        """Each step of the script is an event of its own (ready alone)."""
        job = RunJob(job_id, spec, requirements, origin)
        self.jobs.append(job)
        script = self.scripts.popleft()
        try:
            for step in script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, _Stall):
                    await asyncio.Event().wait()
                else:
                    job.relayed(step)
                    yield [step]
        finally:
            job.closed = True


_nodes = itertools.count(1)


def completion(
    tokens: Sequence[str],
    *,
    prompt_tokens: int,
    operator: str = "",
    finish_reason: FinishReason = FinishReason.STOP,
) -> list[JobEvent]:
    """A node's whole answer: assigned, one delta per token (the first reports the
    prompt), finished with the node's signed usage."""
    node_id = f"node-{next(_nodes)}"
    usage = Usage(prompt_tokens, len(tokens))
    return [
        JobAssigned(node_id),
        *(
            JobDelta(text, 1, prompt_tokens if index == 0 else 0)
            for index, text in enumerate(tokens)
        ),
        JobFinished(finish_reason, usage, (NodeUsage(node_id, usage, operator),)),
    ]
