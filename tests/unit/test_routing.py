from __future__ import annotations

import random

from core.inference import ChatMessage, ChatRole, GenerationSpec, NodeRequirements, Sampling
from core.prompt_prefixes import prefix_fingerprints
from server.network.node_index import NodeIndex
from server.network.nodes import ModelStatus, ModelValidation, NodeHello, NodeModel, NodeSession
from server.network.routable import RoutableNode
from server.network.routing import (
    AFFINITY_HOLDERS,
    NO_REQUIREMENTS,
    Affinity,
    Route,
    RouteContext,
    Router,
    RouteRequest,
    job_prefixes,
)

SUSPECT_S = 15.0


def _node(node_id: str, models: tuple[str, ...] = ("m",), slots: int = 2) -> NodeSession:
    hello = NodeHello(node_id, "test", tuple(NodeModel(m, "rt", 2048) for m in models), slots)
    return NodeSession(node_id=node_id, hello=hello)


def _router(*nodes: NodeSession, sample_size: int = 32) -> Router:
    router = Router(suspect_after_s=SUSPECT_S, sample_size=sample_size, rng=random.Random(7))
    for node in nodes:
        router.add(node)
    return router


def _pick(router: Router, model: str = "m", exclude: frozenset[str] = frozenset()) -> str | None:
    route = router.pick(RouteRequest(model, exclude), now=nodes_now())
    return None if route is None else route.node.node_id


def nodes_now() -> float:
    import time

    return time.monotonic()


def test_only_nodes_serving_the_model_are_candidates() -> None:
    router = _router(_node("a", ("m",)), _node("b", ("other",)))
    assert _pick(router, "m") == "a"
    assert _pick(router, "other") == "b"
    assert _pick(router, "unknown") is None
    assert router.count("m") == 1


def test_least_loaded_node_wins() -> None:
    busy, idle = _node("busy"), _node("idle")
    busy.active_jobs.add("job")
    assert _pick(_router(busy, idle)) == "idle"


def test_load_is_relative_to_capacity() -> None:
    big, small = _node("big", slots=4), _node("small", slots=1)
    big.active_jobs.update({"1", "2"})
    small.active_jobs.add("3")
    assert _pick(_router(big, small)) == "big"


def test_equal_nodes_take_turns() -> None:
    router = _router(_node("a"), _node("b"))
    picks = [_pick(router) for _ in range(4)]
    assert sorted(picks[:2]) == ["a", "b"]
    assert picks[2:] == picks[:2]


def test_faster_node_wins_between_equally_loaded_ones() -> None:
    slow, fast = _node("slow"), _node("fast")
    slow.recent_tokens_per_second, fast.recent_tokens_per_second = 10.0, 40.0
    router = _router(slow, fast)
    assert [_pick(router) for _ in range(3)] == ["fast"] * 3


def test_load_outweighs_speed() -> None:
    slow, fast = _node("slow", slots=1), _node("fast", slots=1)
    slow.recent_tokens_per_second, fast.recent_tokens_per_second = 1.0, 100.0
    fast.active_jobs.add("job")
    assert _pick(_router(slow, fast)) == "slow"


def test_draining_suspect_and_excluded_nodes_are_not_routed_to() -> None:
    draining, suspect, excluded, ready = _node("d"), _node("s"), _node("x"), _node("r")
    draining.draining = True
    suspect.last_seen -= SUSPECT_S + 1
    router = _router(draining, suspect, excluded, ready)
    assert _pick(router, exclude=frozenset({"x"})) == "r"
    assert _pick(router, exclude=frozenset({"x", "r"})) is None


def test_removed_nodes_leave_the_index() -> None:
    a, b, c = _node("a"), _node("b"), _node("c")
    router = _router(a, b, c)
    router.remove(a)
    router.remove(a)
    assert router.count("m") == 2
    assert {_pick(router) for _ in range(4)} == {"b", "c"}
    router.remove(b)
    router.remove(c)
    assert _pick(router) is None


def test_large_pools_are_sampled_but_a_lone_eligible_node_is_still_found() -> None:
    nodes = [_node(f"n{i}") for i in range(500)]
    for node in nodes[1:]:
        node.draining = True
    router = _router(*nodes, sample_size=8)
    assert _pick(router) == "n0"


def test_sampling_spreads_jobs_over_a_large_pool() -> None:
    nodes = [_node(f"n{i}", slots=4) for i in range(200)]
    router = _router(*nodes, sample_size=8)
    for index in range(400):
        route = router.pick(RouteRequest("m"), nodes_now())
        assert route is not None
        route.node.active_jobs.add(str(index))
    # Power of d choices: 2 jobs per node on average, never a pile-up.
    assert max(len(node.active_jobs) for node in nodes) <= 4


def test_reputation_decides_between_equally_loaded_nodes() -> None:
    trusted, doubted = _node("trusted"), _node("doubted")
    doubted.standing.reputation = 0.6
    assert _pick(_router(doubted, trusted)) == "trusted"


def test_a_node_is_routed_only_the_models_it_was_indexed_for() -> None:
    node = _node("a", ("m", "other"))
    router = Router(suspect_after_s=SUSPECT_S)
    router.add(node, ("m",))
    assert _pick(router, "m") == "a"
    assert _pick(router, "other") is None


def test_validating_and_quarantined_nodes_get_no_jobs() -> None:
    validating, quarantined = _node("validating"), _node("quarantined")
    validating.model_status["m"] = ModelStatus(ModelValidation.PENDING)
    quarantined.standing.quarantine_reason = "failed canaries"
    assert _pick(_router(validating, quarantined)) is None


def _member(node_id: str, operator: str = "", region: str = "", slots: int = 2) -> NodeSession:
    hello = NodeHello(node_id, "test", (NodeModel("m", "rt", 2048),), slots, region=region)
    return NodeSession(node_id=node_id, hello=hello, operator_account_id=operator)


def _picks(router: Router, rules: NodeRequirements, times: int = 20) -> set[str | None]:
    picked = set()
    for _ in range(times):
        route = router.pick(RouteRequest("m", requirements=rules), nodes_now())
        picked.add(None if route is None else route.node.node_id)
    return picked


def test_operator_rule_admits_only_those_operators_nodes() -> None:
    router = _router(_member("a1", "op-a"), _member("b1", "op-b"), _member("none"))
    assert _picks(router, NodeRequirements(operator_account_ids=frozenset({"op-a"}))) == {"a1"}
    both = NodeRequirements(operator_account_ids=frozenset({"op-a", "op-b"}))
    assert _picks(router, both) == {"a1", "b1"}
    assert _picks(router, NodeRequirements(operator_account_ids=frozenset({"op-c"}))) == {None}


def test_region_rule_admits_only_declared_regions() -> None:
    router = _router(_member("eu", region="eu-west"), _member("us", region="us-east"), _member("x"))
    assert _picks(router, NodeRequirements(regions=frozenset({"eu-west"}))) == {"eu"}
    # An undeclared region matches no region rule.
    assert _picks(router, NodeRequirements(regions=frozenset({"ap-south"}))) == {None}


def test_min_reputation_rule() -> None:
    clean, doubted = _member("clean"), _member("doubted")
    doubted.standing.reputation = 0.7
    router = _router(clean, doubted)
    clean.active_jobs.update({"1", "2"})  # busier: without the rule it would lose
    assert _picks(router, NodeRequirements(min_reputation=0.8)) == {"clean"}
    assert _picks(router, NodeRequirements(min_reputation=0.7)) == {"doubted"}


def test_verified_rule_needs_an_operator_and_no_failed_canary() -> None:
    verified, tokenless, failed = _member("v", "op"), _member("t"), _member("f", "op")
    failed.standing.failed_canary = True
    router = _router(verified, tokenless, failed)
    assert _picks(router, NodeRequirements(verified_only=True)) == {"v"}
    verified.standing.failed_canary = True
    assert _picks(router, NodeRequirements(verified_only=True)) == {None}


def test_every_rule_must_hold() -> None:
    rules = NodeRequirements(
        operator_account_ids=frozenset({"op-a"}), regions=frozenset({"eu"}), min_reputation=0.5
    )
    nodes = [
        _member("right", "op-a", "eu"),
        _member("wrong-operator", "op-b", "eu"),
        _member("wrong-region", "op-a", "us"),
        _member("low", "op-a", "eu"),
    ]
    nodes[3].standing.reputation = 0.4
    assert _picks(_router(*nodes), rules) == {"right"}


def test_rules_are_kept_in_large_pools_and_a_lone_eligible_node_is_found() -> None:
    """A thousand nodes, one of the required operator's among them, one in the
    required region without a job slot to spare: sampled or scanned, the rules hold."""
    nodes = [_member(f"n{i}", f"op-{i % 10}", f"r{i % 7}") for i in range(1000)]
    router = _router(*nodes, sample_size=8)
    lone = _member("lone", "op-lone", "r0")
    router.add(lone)
    assert _picks(router, NodeRequirements(operator_account_ids=frozenset({"op-lone"}))) == {"lone"}
    in_r3 = {node.node_id for node in nodes if node.region == "r3"}
    assert _picks(router, NodeRequirements(regions=frozenset({"r3"})), times=50) <= in_r3
    # Only non-draining node of operator op-1 in region r1: found by the full scan.
    ops = frozenset({"op-1", "op-2"})
    eligible = [n for n in nodes if n.operator_account_id in ops and n.region == "r1"]
    for node in eligible[1:]:
        node.draining = True
    rules = NodeRequirements(operator_account_ids=ops, regions=frozenset({"r1"}))
    assert _picks(router, rules) == {eligible[0].node_id}


def test_count_counts_only_nodes_meeting_the_rules() -> None:
    a, b, c = _member("a", "op-a", "eu"), _member("b", "op-b", "eu"), _member("c", "op-a", "us")
    router = _router(a, b, c)
    assert router.count("m") == 3
    assert router.count("m", NodeRequirements(regions=frozenset({"eu"}))) == 2
    rules = NodeRequirements(operator_account_ids=frozenset({"op-a"}), regions=frozenset({"eu"}))
    assert router.count("m", rules) == 1
    router.remove(a)
    assert router.count("m", rules) == 0
    assert router.count("m", NodeRequirements(operator_account_ids=frozenset({"op-a"}))) == 1


def test_a_rule_naming_several_operators_samples_across_all_of_them() -> None:
    nodes = [_member(f"{op}-{i}", op) for op in ("op-a", "op-b", "op-c") for i in range(60)]
    router = _router(*nodes, sample_size=8)
    rules = NodeRequirements(operator_account_ids=frozenset({"op-a", "op-b"}))
    operators = set()
    for index in range(100):
        route = router.pick(RouteRequest("m", requirements=rules), nodes_now())
        assert route is not None
        route.node.active_jobs.add(str(index))
        operators.add(route.node.operator_account_id)
    assert operators == {"op-a", "op-b"}


# --- prefix affinity ----------------------------------------------------------------

TURN_ONE = (ChatMessage(ChatRole.USER, "plan a trip"), ChatMessage(ChatRole.ASSISTANT, "where to?"))
FOLLOW_UP = (*TURN_ONE, ChatMessage(ChatRole.USER, "Lisbon"))


def _holding(node: NodeSession, messages: tuple[ChatMessage, ...]) -> NodeSession:
    node.cached_prefixes = frozenset({prefix_fingerprints("m", None, messages)[-1]})
    return node


def _follow_up(router: Router, exclude: frozenset[str] = frozenset()) -> str | None:
    spec = GenerationSpec("m", FOLLOW_UP, Sampling(max_tokens=8), 100)
    request = RouteRequest("m", exclude, prefixes=job_prefixes(spec))
    route = router.pick(request, now=nodes_now())
    return None if route is None else route.node.node_id


def test_a_follow_up_goes_to_the_node_holding_its_conversation() -> None:
    cached, other = _holding(_node("cached"), TURN_ONE), _node("other")
    router = _router(cached, other)
    # Round-robin alone would send the next job to the node that waited longest.
    assert _pick(router) == "cached"
    assert [_follow_up(router) for _ in range(3)] == ["cached"] * 3


def test_the_longest_cached_prefix_wins() -> None:
    first_message = _holding(_node("short"), TURN_ONE[:1])
    whole_turn = _holding(_node("long"), TURN_ONE)
    assert _follow_up(_router(first_message, whole_turn)) == "long"


def test_affinity_outweighs_a_little_more_load() -> None:
    cached, idle = _holding(_node("cached", slots=4), TURN_ONE), _node("idle", slots=4)
    cached.active_jobs.update({"1", "2"})
    assert _follow_up(_router(cached, idle)) == "cached"


def test_affinity_outweighs_speed() -> None:
    cached, fast = _holding(_node("cached"), TURN_ONE), _node("fast")
    cached.recent_tokens_per_second, fast.recent_tokens_per_second = 1.0, 100.0
    assert _follow_up(_router(cached, fast)) == "cached"


def test_a_much_busier_cached_node_does_not_take_the_follow_up() -> None:
    cached, idle = _holding(_node("cached", slots=4), TURN_ONE), _node("idle", slots=4)
    cached.active_jobs.update({"1", "2", "3"})
    assert _follow_up(_router(cached, idle)) == "idle"


def test_a_saturated_cached_node_leaves_the_follow_up_to_a_node_with_a_free_slot() -> None:
    cached, busy = _holding(_node("cached", slots=2), TURN_ONE), _node("busy", slots=2)
    cached.active_jobs.update({"1", "2"})
    busy.active_jobs.add("3")
    assert _follow_up(_router(cached, busy)) == "busy"


def test_an_excluded_cached_node_is_not_routed_to() -> None:
    cached, other = _holding(_node("cached"), TURN_ONE), _node("other")
    assert _follow_up(_router(cached, other), frozenset({"cached"})) == "other"


def test_text_completions_and_embeddings_carry_no_prefixes() -> None:
    completion = GenerationSpec("m", (), Sampling(max_tokens=8), 100, prompt="plan a trip")
    embedding = GenerationSpec("m", (), Sampling(max_tokens=0), 100, prompt="trip", embed=True)
    assert job_prefixes(completion) == job_prefixes(embedding) == ()
    cached, other = _holding(_node("cached"), TURN_ONE), _node("other")
    router = _router(cached, other)
    picks = [router.pick(RouteRequest("m"), nodes_now()) for _ in range(2)]
    assert sorted(route.node.node_id for route in picks if route is not None) == [
        "cached",
        "other",
    ]


def _follow_up_affinity(router: Router, exclude: frozenset[str] = frozenset()) -> Affinity:
    spec = GenerationSpec("m", FOLLOW_UP, Sampling(max_tokens=8), 100)
    route = router.pick(RouteRequest("m", exclude, prefixes=job_prefixes(spec)), nodes_now())
    assert route is not None
    return route.affinity


def test_each_decision_says_how_affinity_fared() -> None:
    # Landed where the conversation is cached.
    cached, other = _holding(_node("cached"), TURN_ONE), _node("other")
    assert _follow_up_affinity(_router(cached, other)) is Affinity.HIT
    # Its holder had no free slot: the turn went elsewhere.
    cached.active_jobs.update({"1", "2"})
    assert _follow_up_affinity(_router(cached, other)) is Affinity.PASSED_OVER
    # Only an excluded node holds it, or none does.
    cached.active_jobs.clear()
    assert _follow_up_affinity(_router(cached, other), frozenset({"cached"})) is Affinity.MISS
    assert _follow_up_affinity(_router(_node("a"), _node("b"))) is Affinity.MISS
    # No conversation to look for (a text completion, an embedding).
    route = _router(cached, other).pick(RouteRequest("m"), nodes_now())
    assert route is not None
    assert route.affinity is Affinity.NONE


# --- prefix affinity in large pools -----------------------------------------------


def _pool(size: int) -> list[NodeSession]:
    return [_node(f"n{i}") for i in range(size)]


def _follow_ups(
    router: Router,
    times: int = 50,
    exclude: frozenset[str] = frozenset(),
    requirements: NodeRequirements = NO_REQUIREMENTS,
) -> list[Route | None]:
    spec = GenerationSpec("m", FOLLOW_UP, Sampling(max_tokens=8), 100)
    asked = RouteRequest("m", exclude, requirements, job_prefixes(spec))
    return [router.pick(asked, nodes_now()) for _ in range(times)]


def _landed(routes: list[Route | None]) -> set[str]:
    return {route.node.node_id for route in routes if route is not None}


def test_in_a_large_pool_the_node_holding_the_conversation_takes_every_next_turn() -> None:
    nodes = _pool(1000)
    holder = _holding(nodes[617], TURN_ONE)
    routes = _follow_ups(_router(*nodes))
    assert _landed(routes) == {holder.node_id}
    assert {route.affinity for route in routes if route is not None} == {Affinity.HIT}


def test_in_a_large_pool_a_busy_or_ineligible_holder_is_not_forced() -> None:
    nodes = _pool(1000)
    holder = _holding(nodes[617], TURN_ONE)
    router = _router(*nodes)
    # No free slot: it is a candidate, and another node wins.
    holder.active_jobs.update({"1", "2"})
    routes = _follow_ups(router)
    assert holder.node_id not in _landed(routes)
    assert {route.affinity for route in routes if route is not None} == {Affinity.PASSED_OVER}
    holder.active_jobs.clear()
    assert holder.node_id not in _landed(_follow_ups(router, exclude=frozenset({"n617"})))
    rules = NodeRequirements(operator_account_ids=frozenset({"op-a"}))
    others = [_member(f"a{i}", "op-a") for i in range(40)]
    for node in others:
        router.add(node)
    assert _landed(_follow_ups(router, requirements=rules)) <= {n.node_id for n in others}
    holder.draining = True
    routes = _follow_ups(router)
    assert holder.node_id not in _landed(routes)
    assert {route.affinity for route in routes if route is not None} == {Affinity.MISS}


def test_a_holder_not_indexed_for_the_model_is_not_forced() -> None:
    nodes = _pool(100)
    router = _router(*nodes)
    # Still validating "m": indexed for "other" alone.
    holder = _holding(_node("holder", ("m", "other")), TURN_ONE)
    router.add(holder, ("other",))
    assert "holder" not in _landed(_follow_ups(router))


def test_the_holders_follow_heartbeats_and_removal() -> None:
    nodes = _pool(1000)
    first, second = nodes[3], nodes[900]
    router = _router(*nodes)
    # Advertised after joining, as a heartbeat does.
    _holding(first, TURN_ONE)
    assert _landed(_follow_ups(router)) == {first.node_id}
    # The conversation moved.
    first.cached_prefixes = frozenset()
    _holding(second, TURN_ONE)
    assert _landed(_follow_ups(router)) == {second.node_id}
    router.remove(second)
    assert second.node_id not in _landed(_follow_ups(router))
    # Its advertisement changed while it was out of the router, and back in.
    second.cached_prefixes = frozenset()
    router.add(second)
    _holding(second, TURN_ONE)
    assert _landed(_follow_ups(router)) == {second.node_id}


def test_a_shared_opening_adds_only_a_few_holders_to_the_sample() -> None:
    """Every node of a large pool holds the first message (a system prompt): the
    decision still looks at the sample and a few holders, not at the pool."""
    nodes = [_holding(node, TURN_ONE[:1]) for node in _pool(1000)]
    looked_at: list[str] = []

    def counted(node: RoutableNode, context: RouteContext) -> bool:
        looked_at.append(node.node_id)
        return True

    router = Router(
        suspect_after_s=SUSPECT_S, filters=(counted,), sample_size=32, rng=random.Random(7)
    )
    for node in nodes:
        router.add(node)
    _follow_ups(router, times=1)
    assert len(looked_at) <= 32 + 2 * AFFINITY_HOLDERS


# --- the index of advertised fingerprints ------------------------------------------


def test_the_index_holds_what_each_node_advertises_now() -> None:
    a, b = _node("a", ("m", "other")), _node("b")
    index = NodeIndex()
    a.cached_prefixes = frozenset({1, 2})
    index.add(a, ("m",))
    index.add(a, ("other",))  # indexed once however many models
    index.add(b, ("m",))
    b.cached_prefixes = frozenset({2, 3})
    assert [list(index.prefixes.holders(f)) for f in (1, 2, 3)] == [[a], [a, b], [b]]
    a.cached_prefixes = frozenset({3})
    assert [list(index.prefixes.holders(f)) for f in (1, 2, 3)] == [[], [b], [b, a]]
    index.remove(b)
    assert [list(index.prefixes.holders(f)) for f in (1, 2, 3)] == [[], [], [a]]
    b.cached_prefixes = frozenset({1})  # no longer indexed: nothing follows it
    assert list(index.prefixes.holders(1)) == []
    # A node held by two routers' indexes keeps both right.
    other = NodeIndex()
    other.add(a, ("m",))
    a.cached_prefixes = frozenset({4})
    assert list(index.prefixes.holders(4)) == list(other.prefixes.holders(4)) == [a]
    index.remove(a)
    other.remove(a)
    assert a.prefix_listeners == []
