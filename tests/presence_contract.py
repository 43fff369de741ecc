"""The presence port's contract (server/network/presence.py), held by every adapter:
a test module subclasses ``PresenceContract`` and provides its ``presence`` fixture."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from server.network.nodes import NodeState
from server.network.presence import (
    LOG_SLACK,
    NodePresence,
    Presence,
    PresenceCursor,
    ReplicaLease,
)


def record(
    node_id: str = "n1", replica_id: str = "r1", *, lease_s: float = 30.0, **changes: object
) -> NodePresence:
    now = time.time()
    base = NodePresence(
        node_id=node_id,
        replica_id=replica_id,
        replica_address=f"{replica_id}.internal:50051",
        state=NodeState.READY,
        models=("m1", "m2"),
        region="eu-west",
        operator_account_id="op-1",
        reputation=0.9,
        verified=True,
        active_jobs=1,
        max_concurrent_jobs=2,
        recent_tokens_per_second=12.5,
        connected_at=now - 10,
        published_at=now,
        expires_at=now + lease_s,
        cached_prefixes=(2**64 - 1, 42, 0),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class PresenceContract:
    async def test_published_records_are_in_the_snapshot_as_published(
        self, presence: Presence
    ) -> None:
        first, second = record("n1", "r1"), record("n2", "r2", state=NodeState.DRAINING)
        await presence.publish([first, second])
        assert sorted(await presence.snapshot(), key=lambda r: r.node_id) == [first, second]

    async def test_a_renewal_replaces_the_record(self, presence: Presence) -> None:
        await presence.publish([record(active_jobs=0)])
        renewed = record(active_jobs=2, state=NodeState.SUSPECT)
        await presence.publish([renewed])
        assert await presence.snapshot() == [renewed]

    async def test_a_record_lapses_with_its_lease(self, presence: Presence) -> None:
        await presence.publish([record("short", lease_s=0.2), record("long")])
        await asyncio.sleep(0.4)
        assert [r.node_id for r in await presence.snapshot()] == ["long"]

    async def test_a_renewal_extends_the_lease(self, presence: Presence) -> None:
        await presence.publish([record(lease_s=0.2)])
        await presence.publish([record(lease_s=30)])
        await asyncio.sleep(0.4)
        assert [r.node_id for r in await presence.snapshot()] == ["n1"]

    async def test_a_replica_withdraws_only_its_own_records(self, presence: Presence) -> None:
        await presence.publish([record("n1", "r1"), record("n2", "r2")])
        await presence.withdraw("r1", ["n1", "n2", "unknown"])
        assert [r.node_id for r in await presence.snapshot()] == ["n2"]

    async def test_the_newer_session_of_a_rehomed_node_wins(self, presence: Presence) -> None:
        now = time.time()
        rehomed = record("n1", "r2", connected_at=now)
        await presence.publish([rehomed])
        # The old replica has not noticed yet: its renewal of the older session loses.
        await presence.publish([record("n1", "r1", connected_at=now - 60)])
        assert await presence.snapshot() == [rehomed]
        # And it cannot withdraw the new owner's record.
        await presence.withdraw("r1", ["n1"])
        assert await presence.snapshot() == [rehomed]
        # A newer session on the old replica takes it back.
        back = record("n1", "r1", connected_at=now + 1)
        await presence.publish([back])
        assert await presence.snapshot() == [back]

    async def test_many_records_in_one_publish(self, presence: Presence) -> None:
        records = [record(f"n{i}", f"r{i % 4}") for i in range(1_200)]
        await presence.publish(records)
        assert len(await presence.snapshot()) == 1_200

    async def test_a_first_read_of_changes_is_everything_with_each_replicas_lease(
        self, presence: Presence
    ) -> None:
        first, second = record("n1", "r1"), record("n2", "r2")
        await presence.publish([first, second])
        changes = await presence.changes(None)
        assert changes.full
        assert sorted(changes.records, key=lambda r: r.node_id) == [first, second]
        assert changes.leases == {
            "r1": ReplicaLease(first.expires_at, first.published_at),
            "r2": ReplicaLease(second.expires_at, second.published_at),
        }

    async def test_a_renewal_is_no_change_but_renews_its_replicas_lease(
        self, presence: Presence
    ) -> None:
        first = record(lease_s=10)
        await presence.publish([first])
        read = await presence.changes(None)
        renewal = replace(
            first, published_at=first.published_at + 1, expires_at=first.expires_at + 5
        )
        await presence.publish([renewal])
        renewed = await presence.changes(read.cursor)
        assert (renewed.full, renewed.records, renewed.removed) == (False, [], [])
        assert renewed.leases == {"r1": ReplicaLease(renewal.expires_at, renewal.published_at)}
        busier = replace(renewal, active_jobs=2)
        await presence.publish([busier])
        changed = await presence.changes(renewed.cursor)
        assert (changed.full, changed.records, changed.removed) == (False, [busier], [])
        # Read from its cursor, nothing changed since.
        assert (await presence.changes(changed.cursor)).records == []

    async def test_withdrawn_and_lapsed_records_are_reported_removed(
        self, presence: Presence
    ) -> None:
        await presence.publish([record("n1"), record("n2", lease_s=0.2), record("n3", "r2")])
        read = await presence.changes(None)
        await presence.withdraw("r1", ["n1"])
        await asyncio.sleep(0.4)
        changes = await presence.changes(read.cursor)
        assert (changes.full, changes.records) == (False, [])
        assert sorted(changes.removed) == ["n1", "n2"]

    async def test_a_cursor_the_log_does_not_know_reads_everything(
        self, presence: Presence
    ) -> None:
        await presence.publish([record("n1")])
        await presence.changes(None)
        changes = await presence.changes(PresenceCursor("another log", 0))
        assert changes.full
        assert [r.node_id for r in changes.records] == ["n1"]

    async def test_a_reader_behind_a_trimmed_log_reads_everything(self, presence: Presence) -> None:
        await presence.publish([record("kept")])
        behind = await presence.changes(None)
        # Nodes come and go until their entries outgrow what the log keeps.
        gone = [f"gone-{i}" for i in range(LOG_SLACK + 10)]
        await presence.publish([record(node_id) for node_id in gone])
        await presence.withdraw("r1", gone)
        caught_up = await presence.changes(behind.cursor)
        assert caught_up.full
        assert [r.node_id for r in caught_up.records] == ["kept"]
        assert not (await presence.changes(caught_up.cursor)).full
