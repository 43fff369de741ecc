from __future__ import annotations

from server.cloud.ports import OperatorLine
from server.cloud.settlement import operator_lines
from server.common.inference import NodeUsage, Usage


def test_each_operator_gets_one_line_with_all_its_nodes_tokens() -> None:
    shares = [
        NodeUsage("n1", Usage(10, 5), "op-a"),
        NodeUsage("n2", Usage(0, 7), "op-b"),
        NodeUsage("n3", Usage(0, 3), "op-a"),
    ]
    assert operator_lines("m", shares) == (
        OperatorLine("op-a", "n1", "m", 18),
        OperatorLine("op-b", "n2", "m", 7),
    )


def test_a_node_without_operator_means_no_lines_so_nobody_is_overpaid() -> None:
    shares = [NodeUsage("n1", Usage(10, 5), "op-a"), NodeUsage("n2", Usage(0, 7))]
    assert operator_lines("m", shares) == ()


def test_no_shares_no_lines() -> None:
    assert operator_lines("m", []) == ()
