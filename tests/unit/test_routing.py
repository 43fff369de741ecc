from __future__ import annotations

from server.network.nodes import NodeHello, NodeModel, NodeSession
from server.network.routing import eligible, pick_node


def _node(node_id: str, models: tuple[str, ...] = ("m",), slots: int = 2) -> NodeSession:
    hello = NodeHello(node_id, "test", tuple(NodeModel(m, "rt", 2048) for m in models), slots)
    return NodeSession(node_id=node_id, hello=hello)


def test_only_nodes_serving_the_model_are_eligible() -> None:
    a, b = _node("a", ("m",)), _node("b", ("other",))
    assert eligible([a, b], "m") == [a]


def test_least_loaded_node_wins() -> None:
    busy, idle = _node("busy"), _node("idle")
    busy.active_jobs.add("job")
    assert pick_node([busy, idle], {}) is idle


def test_load_is_relative_to_capacity() -> None:
    big, small = _node("big", slots=4), _node("small", slots=1)
    big.active_jobs.update({"1", "2"})
    small.active_jobs.add("3")
    assert pick_node([big, small], {}) is big


def test_ties_go_to_the_node_assigned_longest_ago() -> None:
    a, b = _node("a"), _node("b")
    assert pick_node([a, b], {"a": 5, "b": 2}) is b
    assert pick_node([a, b], {"b": 2}) is a


def test_no_candidates_no_node() -> None:
    assert pick_node([], {}) is None
