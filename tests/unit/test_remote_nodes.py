"""The router's view of other replicas' nodes, rebuilt from presence snapshots."""

from __future__ import annotations

import random
import time
from dataclasses import replace

from server.network.nodes import NodeHello, NodeModel, NodeSession, NodeState
from server.network.presence import NodePresence
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
    node = router.pick(RouteRequest("m", exclude), time.monotonic())
    return None if node is None else node.node_id


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
    assert router.pick(RouteRequest("m"), time.monotonic()) is local
