"""What the cloud layer needs from the account and network layers."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

from core.errors import PermissionDenied, quote
from core.inference import (
    NO_ORIGIN,
    CatalogModel,
    GenerationSpec,
    JobEvent,
    JobOrigin,
    NodeRequirements,
    NodeUsage,
    Usage,
)
from core.job_records import JobOutcome, JobQuery, JobRecord
from server.common.inference_logging import LOGGING_OFF, InferenceLogging
from server.common.rate_limits import NO_LIMITS, RateLimits

# Settlements travel beyond the cloud layer (server/common/settlements.py).
from server.common.settlements import OperatorLine as OperatorLine
from server.common.settlements import OperatorShares as OperatorShares
from server.common.settlements import Settlement

NO_REQUIREMENTS = NodeRequirements()


@dataclass(frozen=True, slots=True)
class Caller:
    account_id: str
    api_key_id: str
    # What the key may do: the "inference" scope, and the models it may call
    # (empty: all).
    may_infer: bool = True
    allowed_models: frozenset[str] = frozenset()
    # The "management" scope acts on the key's own account, "admin" on all.
    may_manage: bool = False
    admin: bool = False
    # The subcloud the key is bound to: its models, prices and node rules apply.
    subcloud_id: str = ""
    # Rate limits stored with the key and with its account (unset: the defaults).
    key_limits: RateLimits = NO_LIMITS
    account_limits: RateLimits = NO_LIMITS
    # Whether the account opted in to inference logs (and their retention).
    inference_logging: InferenceLogging = LOGGING_OFF

    def require_inference(self) -> None:
        if not self.may_infer:
            raise PermissionDenied("This API key may not be used for inference")

    def require_model(self, model: str) -> None:
        if self.allowed_models and model not in self.allowed_models:
            raise PermissionDenied(f"This API key may not use the model '{quote(model)}'")


@dataclass(frozen=True, slots=True)
class HoldRef:
    hold_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key; ``secret`` is shown once and kept nowhere."""

    api_key_id: str
    account_id: str
    prefix: str
    secret: str


@dataclass(frozen=True, slots=True)
class RelayedJob:
    """The network's record of a job: what it relayed and who ran it."""

    job_id: str
    # Prompt tokens as billed, completion tokens as relayed.
    usage: Usage
    # (node id, operator account id) of each assignment, in epoch order.
    nodes: tuple[tuple[str, str], ...]
    # False while the job runs (or its end is not written yet).
    ended: bool

    @classmethod
    def of(cls, record: JobRecord) -> RelayedJob:
        return cls(
            record.job_id,
            record.usage,
            tuple((a.node_id, a.operator_account_id) for a in record.assignments),
            record.outcome is not JobOutcome.RUNNING,
        )

    def node_usage(self) -> tuple[NodeUsage, ...]:
        """The job's usage credited to the node that ran it last (the record does
        not split it between the nodes of a migrated job)."""
        if not self.nodes:
            return ()
        node_id, operator = self.nodes[-1]
        return (NodeUsage(node_id, self.usage, operator),)


class AccountPort(Protocol):
    async def authenticate(self, secret: str) -> Caller: ...

    async def require_account(self, account_id: UUID) -> None:
        """Raises NotFound unless the account exists."""
        ...

    async def issue_api_key(
        self,
        account_id: UUID,
        *,
        name: str,
        expires: datetime | None,
        allowed_models: tuple[str, ...],
        subcloud_id: str,
    ) -> IssuedKey:
        """An inference key of ``account_id`` bound to ``subcloud_id``."""
        ...

    async def create_hold(
        self, account_id: str, amount: int, *, idempotency_key: str, expires: datetime
    ) -> HoldRef: ...

    async def settle_hold(self, hold_id: str, capture: int, shares: OperatorShares) -> int:
        """Captures ``capture`` of the hold, releases the rest, credits the operators of
        ``shares`` their part; returns the captured amount. LedgerUnavailable when the
        account layer does not answer."""
        ...


class SettlementPort(Protocol):
    async def settle(self, settlement: Settlement) -> int:
        """Settles the hold now or later, but exactly once; returns the captured amount."""
        ...


class NetworkPort(Protocol):
    async def list_models(
        self, requirements: NodeRequirements = NO_REQUIREMENTS
    ) -> list[CatalogModel]:
        """The catalog; ``ready_nodes`` counts only nodes meeting ``requirements``."""
        ...

    def run_job(
        self,
        job_id: str,
        spec: GenerationSpec,
        requirements: NodeRequirements = NO_REQUIREMENTS,
        origin: JobOrigin = NO_ORIGIN,
    ) -> AsyncGenerator[Sequence[JobEvent], None]:
        """Runs the job on nodes meeting ``requirements`` (failover included); the
        network's record of it names ``origin``. Yields the job's events, those that
        were ready together in one sequence."""
        ...

    async def job_records(self, job_ids: Sequence[str]) -> list[RelayedJob]:
        """The network's records of those of ``job_ids`` it has one of."""
        ...

    async def job_record(self, job_id: str) -> JobRecord | None:
        """The network's whole record of one job; None if it has none."""
        ...

    async def list_job_records(
        self, query: JobQuery, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        """Records matching ``query``, newest first, and the next page's token (the
        network's paging: 0 means its default size)."""
        ...
