"""A presence record's content digest, which Redis compares for ``NodePresence.renews``."""

from __future__ import annotations

from dataclasses import fields, replace

from server.network.nodes import NodeState
from server.network.presence import NodePresence
from tests.presence_contract import record

# A different value for every field.
CHANGED: dict[str, object] = {
    "node_id": "n2",
    "replica_id": "r2",
    "replica_address": "r2.internal:50051",
    "state": NodeState.DRAINING,
    "models": ("m1",),
    "region": "us-east",
    "operator_account_id": "op-2",
    "reputation": 0.5,
    "verified": False,
    "active_jobs": 2,
    "max_concurrent_jobs": 3,
    "recent_tokens_per_second": 12.25,
    "connected_at": 1.5,
    "published_at": 2.5,
    "expires_at": 3.5,
    "cached_prefixes": (1, 2),
    "node_name": "renamed",
    "quarantine_reason": "bad results",
    "agent_version": "0.2.0",
    "config_version": 7,
}


def test_every_field_is_covered() -> None:
    assert set(CHANGED) == {each.name for each in fields(NodePresence)}


def test_the_digest_changes_exactly_when_the_record_is_more_than_a_renewal() -> None:
    original = record()
    for name, value in CHANGED.items():
        changed = replace(original, **{name: value})  # type: ignore[arg-type]
        same_digest = changed.content_digest() == original.content_digest()
        assert same_digest == changed.renews(original), name
        assert same_digest == (name in ("published_at", "expires_at")), name
