"""Two deployments on one fan-out bus, each in a namespace of its own
(core/namespace.py), hear none of each other's announcements: invalidations and
a network's configuration changes.

A test module imports these tests and provides the ``bus`` fixture: the medium
both deployments share (this process's bus, or Redis pub/sub). Each proof
announces in the first namespace, then in the second: the second's listener,
which would have heard the first announcement before its own, hears only its own.
"""

from __future__ import annotations

from core.namespace import RedisNames
from server.common.bus import Bus
from server.common.channel_follower import ChannelFollower
from server.common.invalidation import Invalidation, Invalidations, Subject
from tests.harness import eventually
from tests.namespaces import new_namespace


class _Recorder:
    def __init__(self) -> None:
        self.changes: list[Invalidation] = []

    def invalidate(self, change: Invalidation) -> None:
        self.changes.append(change)

    def invalidate_all(self) -> None:
        raise AssertionError("the bus did not reconnect here")


async def test_a_namespace_hears_only_its_own_invalidations(bus: Bus) -> None:
    first, second = RedisNames(new_namespace()), RedisNames(new_namespace())
    ours, theirs = Invalidations(bus, first.invalidations), Invalidations(bus, second.invalidations)
    heard_ours, heard_theirs = _Recorder(), _Recorder()
    ours.subscribe(heard_ours)
    theirs.subscribe(heard_theirs)
    await ours.start()
    await theirs.start()
    try:
        revoked, changed = (
            Invalidation(Subject.API_KEY, "k1"),
            Invalidation(Subject.ACCOUNT, "a1"),
        )
        await ours.announce(revoked)
        await theirs.announce(changed)
        await eventually(lambda: bool(heard_ours.changes) and bool(heard_theirs.changes))
        assert heard_ours.changes == [revoked]
        assert heard_theirs.changes == [changed]
    finally:
        await ours.stop()
        await theirs.stop()


async def test_a_namespace_hears_only_its_own_network_announcements(bus: Bus) -> None:
    """Both deployments run a network of the same id (the default one, say)."""
    channels = [
        RedisNames(new_namespace()).network_channel("resultity-local", "config") for _ in "ab"
    ]
    heard: list[list[bytes]] = [[], []]

    def recorder(index: int) -> ChannelFollower:
        async def record(message: bytes) -> None:
            heard[index].append(message)

        return ChannelFollower(bus, channels[index], record, poll_s=None)

    followers = [recorder(0), recorder(1)]
    for follower in followers:
        await follower.start()
    try:
        await followers[0].announce(b"7")
        await followers[1].announce(b"3")
        await eventually(lambda: all(heard))
        assert heard == [[b"7"], [b"3"]]
    finally:
        for follower in followers:
            await follower.stop()
