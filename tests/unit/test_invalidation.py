"""Invalidations: the bus (a contract, in-process and over Redis) and what the caches
of cloud drop when one arrives."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from core.errors import InvalidApiKey
from core.inference import NodeRequirements
from server.cloud.auth import CachedAuthenticator
from server.cloud.ports import Caller
from server.cloud.subcloud_service import SubcloudResolver
from server.cloud.subclouds import Subcloud, SubcloudMember, SubcloudModel, SubcloudRole
from server.common.invalidation import (
    Invalidation,
    InvalidationBus,
    LocalBus,
    Subject,
)
from server.common.redis_client import connect
from server.common.redis_invalidation import RedisBus
from tests.harness import eventually

KEY = Invalidation(Subject.API_KEY, "key-1")


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
    """A bus that publishes, and one bus per replica that listens."""

    publisher: InvalidationBus
    listening: list[InvalidationBus]


@pytest.fixture(params=["in-process", pytest.param("redis", marks=pytest.mark.integration)])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    if request.param == "in-process":
        local = LocalBus()
        yield Replicas(local, [local, local])
        return
    url = request.getfixturevalue("redis_url")
    channel = f"test:{uuid.uuid4().hex}"
    clients = [connect(url) for _ in range(3)]
    buses = [RedisBus(client, channel=channel) for client in clients]
    try:
        yield Replicas(buses[0], list(buses[1:]))
    finally:
        for bus, client in zip(buses, clients, strict=True):
            await bus.close()
            await client.aclose()


async def _subscribed(replicas: Replicas) -> list[_Recorder]:
    recorders = [_Recorder() for _ in replicas.listening]
    for bus, recorder in zip(replicas.listening, recorders, strict=True):
        bus.subscribe(recorder)
        if isinstance(bus, RedisBus):
            await asyncio.wait_for(bus.subscribed.wait(), timeout=10)
    return recorders


async def test_every_replica_hears_a_change(replicas: Replicas) -> None:
    recorders = await _subscribed(replicas)
    await replicas.publisher.publish(KEY)
    await eventually(lambda: all(recorder.changes == [KEY] for recorder in recorders))


async def test_changes_arrive_in_order(replicas: Replicas) -> None:
    [first, *_] = await _subscribed(replicas)
    changes = [Invalidation(Subject.SUBCLOUD, str(index)) for index in range(20)]
    for change in changes:
        await replicas.publisher.publish(change)
    await eventually(lambda: first.changes == changes)


def test_unknown_messages_decode_to_nothing() -> None:
    assert Invalidation.decode(KEY.encode()) == KEY
    assert Invalidation.decode("node:1") is None
    assert Invalidation.decode("api_key:") is None


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
