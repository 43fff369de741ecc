"""A settlement as the ledger's ``SettleHoldRequest``: the RPC's body, and the body
of a queued settlement (so any language can read the queue)."""

from __future__ import annotations

from resultity.account.v1 import ledger_service_pb2 as ledger_pb

from server.common.settlements import OperatorLine, OperatorShares, Settlement


def settlement_to_pb(settlement: Settlement) -> ledger_pb.SettleHoldRequest:
    return ledger_pb.SettleHoldRequest(
        hold_id=settlement.hold_id,
        capture_micro_credits=settlement.capture,
        lines=[
            ledger_pb.SettlementLine(
                operator_account_id=line.operator_account_id,
                node_id=line.node_id,
                model=line.model,
                tokens=line.tokens,
            )
            for line in settlement.shares.lines
        ],
        total_tokens=settlement.shares.total_tokens,
    )


def settlement_from_pb(request: ledger_pb.SettleHoldRequest) -> Settlement:
    return Settlement(
        request.hold_id,
        request.capture_micro_credits,
        OperatorShares(
            tuple(
                OperatorLine(line.operator_account_id, line.node_id, line.model, line.tokens)
                for line in request.lines
            ),
            request.total_tokens,
        ),
    )
