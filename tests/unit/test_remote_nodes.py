"""The router's view of other replicas' nodes, rebuilt from presence snapshots."""

from __future__ import annotations

import base64
import json
import random
import time
from dataclasses import replace

import pytest

from core.inference import ChatMessage, ChatRole
from core.prompt_prefixes import MAX_ADVERTISED_PREFIXES, prefix_fingerprints
from server.network.nodes import NodeHello, NodeModel, NodeSession, NodeState
from server.network.presence import NodePresence, PresenceChanges, PresenceCursor, ReplicaLease
from server.network.remote_nodes import RemoteNode, RemoteNodes
from server.network.routing import Router, RouteRequest

SUSPECT_S = 15.0


def record(node_id: str, replica_id: str = "r2", **changes: object) -> NodePresence:
    now = time.time()
    base = NodePresence(
        node_id=node_id,
        replica_id=replica_id,
        replica_address=f"{replica_id}:50051",
        state=NodeState.READY,
        models=("m",),
        region="",
        operator_account_id="",
        reputation=1.0,
        verified=False,
        active_jobs=0,
        max_concurrent_jobs=1,
        recent_tokens_per_second=0.0,
        connected_at=now - 5,
        published_at=now,
        expires_at=now + 30,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def view(*local: str) -> tuple[Router, RemoteNodes]:
    router = Router(suspect_after_s=SUSPECT_S, rng=random.Random(3))
    return router, RemoteNodes(router, "r1", is_local=set(local).__contains__)


def pick(router: Router, exclude: frozenset[str] = frozenset()) -> str | None:
    route = router.pick(RouteRequest("m", exclude), time.monotonic())
    return None if route is None else route.node.node_id


def test_other_replicas_nodes_are_routed_to_and_own_records_are_ignored() -> None:
    router, remote = view("local-node")
    remote.apply([record("mine", replica_id="r1"), record("local-node"), record("theirs")])
    assert router.count("m") == 1
    assert pick(router) == "theirs"


def test_a_node_missing_from_the_next_snapshot_is_dropped() -> None:
    router, remote = view()
    remote.apply([record("a"), record("b")])
    remote.apply([record("b")])
    assert router.count("m") == 1
    assert remote.get("a") is None


def test_published_state_and_load_are_what_routing_reads() -> None:
    router, remote = view()
    remote.apply([record("busy", active_jobs=1), record("idle")])
    assert pick(router) == "idle"
    remote.apply([record("busy", active_jobs=1), record("idle", state=NodeState.DRAINING)])
    assert pick(router) == "busy"


def test_a_pick_reserves_load_until_the_next_snapshot() -> None:
    router, remote = view()
    remote.apply([record("a"), record("b")])
    first = remote.get(str(pick(router)))
    assert isinstance(first, RemoteNode)
    first.reserve()
    assert pick(router) != first.node_id


def test_a_lapsed_lease_makes_the_node_suspect_before_the_next_snapshot() -> None:
    router, remote = view()
    remote.apply([record("a", expires_at=time.time() + 0.01)])
    time.sleep(0.02)
    assert pick(router) is None


def test_a_rehomed_node_is_reindexed_under_its_new_replica() -> None:
    router, remote = view()
    remote.apply([record("a", replica_id="r2")])
    remote.apply([record("a", replica_id="r3", connected_at=time.time())])
    node = remote.get("a")
    assert node is not None
    assert node.replica_id == "r3"
    assert router.count("m") == 1


def test_an_unreachable_replica_is_left_out_until_it_publishes_again() -> None:
    router, remote = view()
    remote.apply([record("a", replica_id="r2"), record("b", replica_id="r3")])
    remote.unreachable("r2")
    assert pick(router) == "b"
    # Its records from before it was found unreachable do not bring it back...
    remote.apply([record("a", replica_id="r2", published_at=time.time() - 1), record("b")])
    assert remote.get("a") is None
    # ...a renewal published afterwards does.
    remote.apply([record("a", replica_id="r2", published_at=time.time() + 1), record("b")])
    assert remote.get("a") is not None


def test_a_node_that_connects_here_is_forgotten_as_remote() -> None:
    router, remote = view()
    remote.apply([record("a")])
    remote.forget("a")
    local = NodeSession("a", NodeHello("a", "test", (NodeModel("m", "rt", 2048),), 1))
    router.add(local)
    route = router.pick(RouteRequest("m"), time.monotonic())
    assert route is not None
    assert route.node is local


def test_a_record_carries_the_nodes_cached_conversations_bounded() -> None:
    advertised = (2**64 - 1, 0, 7)
    sent = record("a", cached_prefixes=advertised)
    assert NodePresence.from_json(sent.to_json()) == sent
    many = record("a", cached_prefixes=tuple(range(MAX_ADVERTISED_PREFIXES + 10)))
    # A replica bounds what it publishes and what it reads.
    assert len(NodePresence.from_json(many.to_json()).cached_prefixes) == MAX_ADVERTISED_PREFIXES
    fields = json.loads(sent.to_json())
    fields["cached_prefixes"] = base64.b64encode(bytes(8 * 100)).decode()
    assert NodePresence.from_json(json.dumps(fields)).cached_prefixes == (0,) * 64
    fields["cached_prefixes"] = base64.b64encode(b"odd").decode()
    with pytest.raises(ValueError, match="whole number"):
        NodePresence.from_json(json.dumps(fields))
    # A record from a replica that predates the field holds none.
    del fields["cached_prefixes"]
    assert NodePresence.from_json(json.dumps(fields)).cached_prefixes == ()


def test_a_remote_node_holding_the_conversation_takes_its_next_turn() -> None:
    turn = (ChatMessage(ChatRole.USER, "hi"), ChatMessage(ChatRole.ASSISTANT, "hello"))
    follow_up = prefix_fingerprints("m", None, (*turn, ChatMessage(ChatRole.USER, "more")))
    router, remote = view()
    remote.apply([record("other"), record("cached", cached_prefixes=follow_up[1:2])])
    picks = [router.pick(RouteRequest("m", prefixes=follow_up), time.monotonic()) for _ in "abc"]
    assert [route.node.node_id for route in picks if route is not None] == ["cached"] * 3
    # It advertises nothing any more: the next snapshot says so.
    remote.apply([record("other"), record("cached")])
    picks = {router.pick(RouteRequest("m", prefixes=follow_up), time.monotonic()) for _ in "ab"}
    assert {route.node.node_id for route in picks if route is not None} == {"cached", "other"}


def test_in_a_large_fleet_the_remote_holder_follows_its_records() -> None:
    turn = (ChatMessage(ChatRole.USER, "hi"), ChatMessage(ChatRole.ASSISTANT, "hello"))
    follow_up = prefix_fingerprints("m", None, (*turn, ChatMessage(ChatRole.USER, "more")))
    held = follow_up[1:2]
    router, remote = view()
    fleet = [record(f"n{i}") for i in range(1000)]

    def landed() -> set[str]:
        asked = RouteRequest("m", prefixes=follow_up)
        routes = [router.pick(asked, time.monotonic()) for _ in range(30)]
        return {route.node.node_id for route in routes if route is not None}

    remote.update(changes(*fleet, replace(fleet[10], cached_prefixes=held), full=True))
    assert landed() == {"n10"}
    # A delta: the conversation moved to another node.
    remote.update(changes(fleet[10], replace(fleet[20], cached_prefixes=held), seq=2))
    assert landed() == {"n20"}
    # Its record changed place (another model set): the node is indexed anew.
    moved = replace(fleet[20], models=("m", "m2"), cached_prefixes=held)
    remote.update(changes(moved, seq=3))
    assert landed() == {"n20"}
    remote.update(changes(removed=("n20",), seq=4))
    assert "n20" not in landed()
    remote.update(changes(*fleet[:500], replace(fleet[700], cached_prefixes=held), full=True))
    assert landed() == {"n700"}
    remote.forget("n700")
    assert "n700" not in landed()


def changes(
    *records: NodePresence,
    removed: tuple[str, ...] = (),
    leases: dict[str, ReplicaLease] | None = None,
    full: bool = False,
    seq: int = 1,
) -> PresenceChanges:
    if leases is None:
        leases = {r.replica_id: ReplicaLease(r.expires_at, r.published_at) for r in records}
    return PresenceChanges(PresenceCursor("log", seq), full, list(records), list(removed), leases)


def test_changes_touch_only_the_nodes_they_name() -> None:
    router, remote = view()
    remote.update(changes(record("a"), record("b"), record("c"), full=True))
    remote.update(changes(record("a", active_jobs=1), removed=("b",), seq=2))
    assert remote.cursor == PresenceCursor("log", 2)
    assert remote.get("b") is None
    assert remote.get("c") is not None
    assert {pick(router, frozenset({"c"})) for _ in "abc"} == {"a"}
    assert pick(router) == "c"  # "a" is busy now


def test_a_full_read_drops_the_nodes_it_lacks() -> None:
    router, remote = view()
    remote.update(changes(record("a"), record("b"), full=True))
    remote.update(changes(record("b"), full=True, seq=5))
    assert remote.get("a") is None
    assert router.count("m") == 1


def test_a_replicas_renewed_lease_keeps_its_unchanged_nodes_routable() -> None:
    router, remote = view()
    short = record("a", expires_at=time.time() + 0.01)
    remote.update(changes(short, full=True))
    renewed = {"r2": ReplicaLease(time.time() + 30, time.time())}
    remote.update(changes(leases=renewed, seq=2))
    time.sleep(0.02)
    assert pick(router) == "a"
    # The replica stops renewing: its nodes turn suspect when its lease lapses.
    remote.update(changes(leases={"r2": ReplicaLease(time.time() - 1, time.time())}, seq=3))
    assert pick(router) is None


def test_a_changed_record_of_a_node_connected_here_drops_its_remote_entry() -> None:
    router, remote = view()
    remote.update(changes(record("b"), full=True))
    remote.update(changes(record("b", replica_id="r1", connected_at=time.time()), seq=2))
    assert remote.get("b") is None
    assert router.count("m") == 0


def test_an_unreachable_replica_that_publishes_again_is_read_anew() -> None:
    router, remote = view()
    remote.update(changes(record("a", replica_id="r2"), record("b", replica_id="r3"), full=True))
    remote.unreachable("r2")
    # A renewal from before it was found unreachable does not bring it back.
    before = {"r2": ReplicaLease(time.time() + 30, time.time() - 1)}
    remote.update(changes(leases=before, seq=2))
    assert remote.cursor == PresenceCursor("log", 2)
    assert remote.get("a") is None
    # Its unchanged records are in no change: the view asks for everything.
    after = {"r2": ReplicaLease(time.time() + 30, time.time() + 1)}
    remote.update(changes(leases=after, seq=3))
    assert remote.cursor is None
    everything = (
        record("a", replica_id="r2", published_at=time.time() + 1),
        record("b", replica_id="r3"),
    )
    remote.update(changes(*everything, leases=after, full=True, seq=3))
    assert remote.get("a") is not None
    assert pick(router, frozenset({"b"})) == "a"
