"""Who earns what from a settled request: one line per node operator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from server.cloud.ports import OperatorLine
from server.common.inference import NodeUsage


def operator_lines(model: str, shares: Sequence[NodeUsage]) -> tuple[OperatorLine, ...]:
    """Lines crediting each operator for the tokens its nodes delivered.

    The ledger splits the operators' part of a capture among the lines it is
    given, so lines are only sent when they cover every delivered token: if any
    share has no operator (a node admitted without a node token), the platform
    keeps the whole capture rather than overpaying the operators it knows.
    An operator with several nodes in one request (after a failover) gets one
    line, named after its first node.
    """
    if not shares or any(not share.operator_account_id for share in shares):
        return ()
    lines: dict[str, OperatorLine] = {}
    for share in shares:
        operator, tokens = share.operator_account_id, share.usage.total_tokens
        current = lines.get(operator)
        lines[operator] = (
            OperatorLine(operator, share.node_id, model, tokens)
            if current is None
            else replace(current, tokens=current.tokens + tokens)
        )
    return tuple(lines.values())
