"""Operators' actions on a node another replica holds: how they cross ReplicaService,
and how the caller's view of the node shows the outcome."""

from __future__ import annotations

import json
import time

import pytest
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import replica_service_pb2 as pb

from core.errors import InvalidArgument
from server.network.node_actions import ActionOutcome, Drain, NodeAction, Quarantine, Release
from server.network.nodes import NodeHello, NodeModel, NodeSession, NodeState
from server.network.presence import NodePresence
from server.network.remote_nodes import RemoteNode
from server.network.replica_convert import (
    action_from_pb,
    action_to_pb,
    outcome_from_pb,
    outcome_to_pb,
)
from tests.unit.test_remote_nodes import record


@pytest.mark.parametrize("action", [Drain(), Quarantine("under review"), Release()])
def test_an_action_crosses_replica_service_as_it_was_asked(action: NodeAction) -> None:
    request = action_to_pb("n1", action)
    assert request.node_id == "n1"
    assert action_from_pb(pb.AdministerNodeRequest.FromString(request.SerializeToString())) == (
        action
    )


def test_a_request_without_an_action_is_refused() -> None:
    with pytest.raises(InvalidArgument) as refused:
        action_from_pb(pb.AdministerNodeRequest(node_id="n1"))
    assert refused.value.metadata["field"] == "action"


def test_an_outcome_crosses_replica_service_whole() -> None:
    node = NodeSession("n1", NodeHello("n", "1.0", (NodeModel("m", "r", 1),), 1))
    node.standing.quarantine_reason = "under review"
    node.standing.reputation = 0.4
    outcome = ActionOutcome.of(node, time.monotonic(), 15.0)
    assert outcome == ActionOutcome(NodeState.QUARANTINED, "under review", 0.4)
    assert outcome_from_pb(outcome_to_pb(outcome)) == outcome
    # A release that found the node gone from its replica.
    gone = ActionOutcome.of(None, time.monotonic(), 15.0)
    assert outcome_to_pb(gone) == pb.AdministerNodeResponse()
    assert outcome_from_pb(outcome_to_pb(gone)) == gone


def test_a_state_this_replica_does_not_know_is_not_routed_to() -> None:
    response = pb.AdministerNodeResponse(connected=True, state=admin_pb.NodeState.ValueType(99))
    assert outcome_from_pb(response).state is NodeState.SUSPECT


def test_the_outcome_shows_in_the_view_until_the_next_record() -> None:
    now, wall_now = time.monotonic(), time.time()
    node = RemoteNode.from_record(record("n1", node_name="far"), now, wall_now)
    assert (node.node_name, node.standing.quarantine_reason) == ("far", "")

    ActionOutcome(None).apply_to(node)
    assert node.state(now, 15.0) is NodeState.READY
    ActionOutcome(NodeState.QUARANTINED, "under review", 1.0).apply_to(node)
    assert node.state(now, 15.0) is NodeState.QUARANTINED
    assert node.standing.quarantine_reason == "under review"

    released = record("n1", node_name="far")
    node.refresh(released, node.replica_lease, now, wall_now)
    assert node.state(now, 15.0) is NodeState.READY
    assert node.standing.quarantine_reason == ""


def test_a_record_of_a_replica_that_predates_the_admin_fields_reads_them_empty() -> None:
    sent = record(
        "n1", node_name="far", quarantine_reason="why", agent_version="1.2.3", config_version=4
    )
    fields = json.loads(sent.to_json())
    assert NodePresence.from_json(json.dumps(fields)) == sent
    for name in ("node_name", "quarantine_reason", "agent_version", "config_version"):
        del fields[name]
    older = NodePresence.from_json(json.dumps(fields))
    assert (older.node_name, older.quarantine_reason, older.agent_version) == ("", "", "")
    assert older.config_version == 0


def test_a_record_of_a_newer_replica_reads_without_the_fields_it_added() -> None:
    sent = record("n1", node_name="far")
    fields = json.loads(sent.to_json())
    fields["a_field_from_a_later_version"] = {"any": "value"}
    assert NodePresence.from_json(json.dumps(fields)) == sent
