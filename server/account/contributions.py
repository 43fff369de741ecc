"""ContributionService: contribution records (RCP) of node operators and the
settlement policy that governs them, as domain calls.

Records are written by settlement (hold_store.py); this reads them, checked
against the caller. Imports neither grpc nor generated code nor storage clients.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol
from uuid import UUID

import structlog

from core.errors import InvalidArgument
from core.ids import parse_id
from server.account.authz import Principal
from server.account.ledger import (
    Contribution,
    ContributionTotal,
    SettlementPolicy,
    validate_policy,
)
from server.common.paging import decode_cursor, encode_cursor, page_size

log = structlog.get_logger(__name__)

DEFAULT_TOTAL_EPOCHS = 30
MAX_TOTAL_EPOCHS = 1000


class ContributionStore(Protocol):
    async def policy(self) -> SettlementPolicy: ...
    async def set_policy(self, policy: SettlementPolicy) -> SettlementPolicy: ...
    async def list_contributions(
        self, operator_id: UUID, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[Contribution]: ...
    async def contribution_totals(
        self, operator_id: UUID, epochs: int
    ) -> tuple[ContributionTotal, list[ContributionTotal]]: ...


class ContributionService:
    def __init__(self, store: ContributionStore) -> None:
        self._store = store

    async def list_contributions(
        self, caller: Principal, operator_account_id: str, requested_size: int, page_token: str
    ) -> tuple[list[Contribution], str]:
        owner = parse_id(operator_account_id, field="operator_account_id")
        caller.require_access(owner)
        limit = page_size(requested_size)
        items = await self._store.list_contributions(owner, limit, decode_cursor(page_token))
        last = items[-1] if len(items) == limit else None
        return items, "" if last is None else encode_cursor(last.created_at, last.contribution_id)

    async def contribution_totals(
        self, caller: Principal, operator_account_id: str, epochs: int
    ) -> tuple[ContributionTotal, list[ContributionTotal], int]:
        owner = parse_id(operator_account_id, field="operator_account_id")
        caller.require_access(owner)
        if not 0 <= epochs <= MAX_TOTAL_EPOCHS:
            raise InvalidArgument(f"epochs must be 0 to {MAX_TOTAL_EPOCHS}", field="epochs")
        overall, per_epoch = await self._store.contribution_totals(
            owner, epochs or DEFAULT_TOTAL_EPOCHS
        )
        policy = await self._store.policy()
        return overall, per_epoch, policy.epoch_seconds

    async def settlement_policy(self, caller: Principal) -> SettlementPolicy:
        """The policy settlements apply now; any authenticated caller may read it."""
        return await self._store.policy()

    async def update_settlement_policy(
        self, caller: Principal, policy: SettlementPolicy
    ) -> SettlementPolicy:
        caller.require_admin()
        stored = await self._store.set_policy(validate_policy(policy))
        log.info("settlement policy updated", policy=str(stored))
        return stored
