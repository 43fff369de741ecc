from __future__ import annotations

from core.inference import NodeUsage, Usage
from server.cloud.ports import OperatorLine, OperatorShares
from server.cloud.settlement import operator_shares


def test_each_operator_gets_one_line_with_all_its_nodes_tokens() -> None:
    shares = [
        NodeUsage("n1", Usage(10, 5), "op-a"),
        NodeUsage("n2", Usage(0, 7), "op-b"),
        NodeUsage("n3", Usage(0, 3), "op-a"),
    ]
    assert operator_shares("m", shares, Usage(10, 15)) == OperatorShares(
        (OperatorLine("op-a", "n1", "m", 18), OperatorLine("op-b", "n2", "m", 7)), 25
    )


def test_nodes_without_operator_count_in_the_total_but_get_no_line() -> None:
    shares = [NodeUsage("n1", Usage(10, 5), "op-a"), NodeUsage("n2", Usage(0, 7))]
    assert operator_shares("m", shares, Usage(10, 12)) == OperatorShares(
        (OperatorLine("op-a", "n1", "m", 15),), 22
    )


def test_tokens_of_a_choice_cut_short_count_in_the_total() -> None:
    # The first choice finished on n1 (15 tokens); the second was cut short
    # after 9 tokens, before its node reported usage.
    shares = [NodeUsage("n1", Usage(10, 5), "op-a")]
    assert operator_shares("m", shares, Usage(20, 14)) == OperatorShares(
        (OperatorLine("op-a", "n1", "m", 15),), 34
    )


def test_the_total_never_falls_below_what_the_nodes_reported() -> None:
    # A continued prompt is processed again by the node that takes the job over.
    shares = [NodeUsage("n1", Usage(10, 4), "op-a"), NodeUsage("n2", Usage(10, 3), "op-b")]
    result = operator_shares("m", shares, Usage(10, 7))
    assert result.total_tokens == 27
    assert sum(line.tokens for line in result.lines) <= result.total_tokens


def test_no_shares_no_lines() -> None:
    assert operator_shares("m", [], Usage(3, 4)) == OperatorShares((), 7)
