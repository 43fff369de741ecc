"""The account side of the settlement queue: applies a queued settlement to the
ledger as the platform's service, exactly as ``SettleHold`` would."""

from __future__ import annotations

from core.ids import parse_id
from server.account.authz import Principal
from server.account.billing import BillingService
from server.account.ledger import SettlementLine
from server.common.settlements import Settlement

_SERVICE = Principal.service()


class SettlementInbox:
    def __init__(self, billing: BillingService) -> None:
        self._billing = billing

    async def apply(self, settlement: Settlement) -> None:
        """Returns once committed (or a replay of a committed settlement); refusals
        are DomainErrors, a database failure anything else."""
        lines = [
            SettlementLine(
                parse_id(line.operator_account_id, field="operator_account_id"),
                line.node_id,
                line.model,
                line.tokens,
            )
            for line in settlement.shares.lines
        ]
        await self._billing.settle_hold(
            _SERVICE, settlement.hold_id, settlement.capture, lines, settlement.shares.total_tokens
        )
