"""Who earns what from a settled request: one line per node operator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from core.inference import NodeUsage, Usage
from server.cloud.ports import OperatorLine, OperatorShares


def operator_shares(model: str, shares: Sequence[NodeUsage], billed: Usage) -> OperatorShares:
    """Lines crediting each operator for the tokens its nodes delivered.

    The ledger gives each line tokens / ``total_tokens`` of the operators'
    part of the capture and the platform the rest, so the tokens of nodes
    without an operator (admitted without a node token) and of a choice cut
    short before its node reported usage earn nobody but the platform. The
    total is what was billed, or more if the nodes reported more (a
    continued prompt counts on each node that processed it). An operator
    with several nodes in one request (after a failover) gets one line,
    named after its first node.
    """
    lines: dict[str, OperatorLine] = {}
    for share in shares:
        operator, tokens = share.operator_account_id, share.usage.total_tokens
        if not operator:
            continue
        current = lines.get(operator)
        lines[operator] = (
            OperatorLine(operator, share.node_id, model, tokens)
            if current is None
            else replace(current, tokens=current.tokens + tokens)
        )
    reported = sum(share.usage.total_tokens for share in shares)
    return OperatorShares(tuple(lines.values()), max(billed.total_tokens, reported))
