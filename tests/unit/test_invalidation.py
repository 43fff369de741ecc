"""Invalidations: announced to every replica (a contract, over the in-process and
the Redis bus) and what the caches of cloud drop when one arrives."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from core.errors import InvalidApiKey
from core.inference import NodeRequirements
from core.namespace import RedisNames
from server.cloud.auth import CachedAuthenticator
from server.cloud.ports import Caller
from server.cloud.subcloud_service import SubcloudResolver
from server.cloud.subclouds import Subcloud, SubcloudMember, SubcloudModel, SubcloudRole
from server.common.bus import Bus
from server.common.bus_memory import MemoryBus
from server.common.bus_redis import RedisBus
from server.common.invalidation import Invalidation, Invalidations, Subject
from tests.harness import eventually

KEY = Invalidation(Subject.API_KEY, "key-1")
CHANNEL = RedisNames().invalidations


class _Recorder:
    def __init__(self) -> None:
        self.changes: list[Invalidation] = []
        self.cleared = 0

    def invalidate(self, change: Invalidation) -> None:
        self.changes.append(change)

    def invalidate_all(self) -> None:
        self.cleared += 1


@dataclasses.dataclass
class Replicas:
    """One replica that announces, and two that listen (each with a recorder)."""

    announcer: Invalidations
    recorders: list[_Recorder]


@pytest.fixture(params=["in-process", pytest.param("redis", marks=pytest.mark.integration)])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    channel = RedisNames(request.getfixturevalue("namespace")).invalidations
    if request.param == "in-process":
        memory = MemoryBus()
        buses: list[Bus] = [memory]
    else:
        url = request.getfixturevalue("redis_url")
        buses = [RedisBus(url) for _ in range(3)]
    each = [Invalidations(buses[index % len(buses)], channel=channel) for index in range(3)]
    recorders = [_Recorder() for _ in each[1:]]
    for invalidations, recorder in zip(each[1:], recorders, strict=True):
        invalidations.subscribe(recorder)
    for invalidations in each:
        await invalidations.start()
    try:
        yield Replicas(each[0], recorders)
    finally:
        for invalidations in each:
            await invalidations.stop()
        for bus in buses:
            await bus.close()


async def test_every_replica_hears_a_change(replicas: Replicas) -> None:
    await replicas.announcer.announce(KEY)
    await eventually(lambda: all(r.changes == [KEY] for r in replicas.recorders))


async def test_changes_arrive_in_order(replicas: Replicas) -> None:
    changes = [Invalidation(Subject.SUBCLOUD, str(index)) for index in range(20)]
    for change in changes:
        await replicas.announcer.announce(change)
    await eventually(lambda: all(r.changes == changes for r in replicas.recorders))


async def test_a_replica_that_resubscribes_drops_everything() -> None:
    """What was announced while it was not subscribed is lost to it: its caches
    may hold what changed meanwhile."""
    bus = MemoryBus()
    invalidations = Invalidations(bus, CHANNEL, retry_s=0.01)
    recorder = _Recorder()
    invalidations.subscribe(recorder)
    await invalidations.start()
    try:
        # The subscription ends, as when Redis goes away.
        for subscription in list(bus._subscribers[CHANNEL]):
            await subscription.close()
        await eventually(lambda: recorder.cleared == 1)
        await invalidations.announce(KEY)  # and it listens again
        await eventually(lambda: recorder.changes == [KEY])
    finally:
        await invalidations.stop()


def test_unknown_messages_decode_to_nothing() -> None:
    assert Invalidation.decode(KEY.encode()) == KEY
    assert Invalidation.decode(b"node:1") is None
    assert Invalidation.decode(b"api_key:") is None


# --- the caches --------------------------------------------------------------


class _Account:
    """Answers for two keys of one account and one of another; counts lookups."""

    def __init__(self) -> None:
        self.callers = {
            "a1": Caller("account-a", "key-a1"),
            "a2": Caller("account-a", "key-a2"),
            "b1": Caller("account-b", "key-b1"),
        }
        self.calls = 0
        self.during_lookup: asyncio.Event | None = None

    async def authenticate(self, secret: str) -> Caller:
        self.calls += 1
        if self.during_lookup is not None:
            self.during_lookup.set()
            await asyncio.sleep(0)
        if secret not in self.callers:
            raise InvalidApiKey("Invalid API key")
        return self.callers[secret]


async def _warm(auth: CachedAuthenticator, *secrets: str) -> None:
    for secret in secrets:
        await auth.authenticate(f"Bearer {secret}")


async def test_a_revoked_key_is_dropped_from_the_cache_and_only_it() -> None:
    account = _Account()
    auth = CachedAuthenticator(account, ttl_s=60)
    await _warm(auth, "a1", "a2")
    del account.callers["a1"]  # revoked in the account layer

    auth.invalidate(Invalidation(Subject.API_KEY, "key-a1"))

    with pytest.raises(InvalidApiKey):
        await auth.authenticate("Bearer a1")
    calls = account.calls
    await auth.authenticate("Bearer a2")  # still cached
    assert account.calls == calls


async def test_an_account_change_drops_all_its_keys() -> None:
    account = _Account()
    auth = CachedAuthenticator(account, ttl_s=60)
    await _warm(auth, "a1", "a2", "b1")
    auth.invalidate(Invalidation(Subject.ACCOUNT, "account-a"))
    calls = account.calls
    await _warm(auth, "a1", "a2", "b1")
    assert account.calls == calls + 2  # b1 was still cached


async def test_a_lookup_that_overlaps_an_invalidation_is_not_cached() -> None:
    account = _Account()
    auth = CachedAuthenticator(account, ttl_s=60)
    account.during_lookup = asyncio.Event()
    lookup = asyncio.create_task(auth.authenticate("Bearer a1"))
    await account.during_lookup.wait()
    # Revoked while the lookup was on its way: its answer may predate that.
    auth.invalidate(Invalidation(Subject.API_KEY, "key-a1"))
    await lookup
    account.during_lookup = None
    calls = account.calls
    await auth.authenticate("Bearer a1")
    assert account.calls == calls + 1


async def test_after_a_reconnect_every_entry_is_looked_up_again() -> None:
    account = _Account()
    auth = CachedAuthenticator(account, ttl_s=60)
    await _warm(auth, "a1", "b1")
    auth.invalidate_all()
    calls = account.calls
    await _warm(auth, "a1", "b1")
    assert account.calls == calls + 2


class _Subclouds:
    def __init__(self, subcloud: Subcloud, member: uuid.UUID) -> None:
        self.subcloud = subcloud
        self.members = {member}
        self.reads = 0

    async def get(self, subcloud_id: uuid.UUID) -> Subcloud | None:
        self.reads += 1
        return self.subcloud if subcloud_id == self.subcloud.subcloud_id else None

    async def member(self, subcloud_id: uuid.UUID, account_id: uuid.UUID) -> SubcloudMember | None:
        if account_id not in self.members:
            return None
        return SubcloudMember(account_id, SubcloudRole.MEMBER, datetime.now(UTC))


async def test_a_subcloud_change_drops_its_resolutions() -> None:
    account = uuid.uuid4()
    offered = (SubcloudModel("m"),)
    subcloud = Subcloud(
        uuid.uuid4(), "s", uuid.uuid4(), datetime.now(UTC), NodeRequirements(), offered
    )
    store = _Subclouds(subcloud, account)
    resolver = SubcloudResolver(store, ttl_s=60)
    caller = Caller(str(account), "key", subcloud_id=str(subcloud.subcloud_id))
    assert await resolver.for_caller(caller) == subcloud

    store.members.clear()  # the member was removed on another replica
    resolver.invalidate(Invalidation(Subject.API_KEY, "key"))  # not about subclouds
    assert await resolver.for_caller(caller) == subcloud
    resolver.invalidate(Invalidation(Subject.SUBCLOUD, str(subcloud.subcloud_id)))
    with pytest.raises(InvalidApiKey):
        await resolver.for_caller(caller)


class _StuckBus(MemoryBus):
    """A bus whose publish never completes (Redis unreachable, no answer)."""

    async def publish(self, channel: str, message: bytes) -> None:
        await asyncio.Event().wait()


async def test_an_announcement_the_bus_does_not_take_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("server.common.invalidation.ANNOUNCE_TIMEOUT_S", 0.01)
    invalidations = Invalidations(_StuckBus(), CHANNEL)
    with capture_logs() as logs:
        await invalidations.announce(KEY)  # returns: the revocation is committed
    assert [entry["event"] for entry in logs] == ["invalidation not announced in time"]
