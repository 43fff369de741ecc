"""A node session's domain logic, without a stream: joining with the challenge's
nonce, and what each of the agent's reports changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.agent_messages import ChunkReport, ConfigApplied, Draining, Heartbeat, StartedReport
from core.errors import InvalidNodeCredentials
from core.namespace import RedisNames
from server.common.bus_memory import MemoryBus
from server.network.catalog import SMOLLM2_135M, Catalog
from server.network.node_index import NodeIndex
from server.network.nodes import NodeHello, NodeModel, NodeSession, SignedHello
from server.network.service import LivenessSettings, NetworkService
from server.network.state_ports import NetworkStores


class _Untouched:
    """A port these tests must not reach: joining and reports use no store, forwarder
    or other replica."""

    def __getattr__(self, name: str) -> Any:
        async def untouched(*args: object) -> None:
            raise AssertionError(f"the store was used: {name}")

        return untouched


def _service() -> NetworkService:
    stores = NetworkStores(_Untouched(), _Untouched(), _Untouched())  # type: ignore[arg-type]
    return NetworkService(
        Catalog([SMOLLM2_135M]),
        LivenessSettings(),
        stores=stores,
        bus=MemoryBus(),
        names=RedisNames(),
        forwarder=_Untouched(),  # type: ignore[arg-type]  # no job is forwarded here
        node_admin=_Untouched(),  # type: ignore[arg-type]  # nor an operator's action
    )


def _hello(nonce: bytes) -> NodeHello:
    return NodeHello(
        "node", "9.9.9", (NodeModel(SMOLLM2_135M.id, "scripted", 2048),), 1, nonce=nonce
    )


async def _assert_spent(service: NetworkService, nonce: bytes) -> None:
    """Nothing can answer ``nonce`` any more."""
    with pytest.raises(InvalidNodeCredentials, match="challenge"):
        await service.admission.admit(_hello(nonce), b"", b"", nonce)


async def _nothing() -> SignedHello | None:
    return None


async def _malformed() -> SignedHello | None:
    raise InvalidNodeCredentials("the signed hello is malformed")


async def _never() -> SignedHello | None:
    await asyncio.Event().wait()
    return None


async def test_a_stream_that_ends_before_its_hello_withdraws_the_nonce() -> None:
    service = _service()
    nonce = service.challenge()
    assert await service.join(nonce, _nothing()) is None
    await _assert_spent(service, nonce)


async def test_a_malformed_opening_is_refused_and_withdraws_the_nonce() -> None:
    service = _service()
    nonce = service.challenge()
    with pytest.raises(InvalidNodeCredentials, match="malformed"):
        await service.join(nonce, _malformed())
    await _assert_spent(service, nonce)


async def test_a_session_cancelled_while_waiting_for_its_hello_withdraws_the_nonce() -> None:
    service = _service()
    nonce = service.challenge()
    joining = asyncio.create_task(service.join(nonce, _never()))
    await asyncio.sleep(0)
    joining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joining
    await _assert_spent(service, nonce)


async def test_a_badly_signed_hello_is_refused() -> None:
    service = _service()
    nonce = service.challenge()

    async def opening() -> SignedHello:
        return SignedHello(_hello(nonce), b"hello", b"not a signature")

    with pytest.raises(InvalidNodeCredentials):
        await service.join(nonce, opening())
    assert service.nodes() == []


def test_reports_update_the_node() -> None:
    service = _service()
    node = NodeSession("n1", _hello(b""))
    node.last_seen = 0.0

    service.handle(node, Heartbeat(1, 2, 12.5, 4096))
    service.handle(node, ConfigApplied(3))
    service.handle(node, Draining())

    assert node.last_seen > 0.0
    assert (node.queued_jobs, node.recent_tokens_per_second, node.free_memory_bytes) == (
        2,
        12.5,
        4096,
    )
    assert (node.config_version, node.draining) == (3, True)


def test_a_heartbeat_keeps_the_router_index_of_cached_prefixes_right() -> None:
    service = _service()
    node = NodeSession("n1", _hello(b""))
    index = NodeIndex()
    index.add(node, node.models)
    service.handle(node, Heartbeat(0, 0, 0.0, cached_prefixes=(7, 5)))
    assert [list(index.prefixes.holders(f)) for f in (5, 7)] == [[node], [node]]
    service.handle(node, Heartbeat(0, 0, 0.0, cached_prefixes=(9, 7)))
    assert [list(index.prefixes.holders(f)) for f in (5, 7, 9)] == [[], [node], [node]]


def test_a_report_for_a_job_the_node_does_not_run_is_dropped() -> None:
    service = _service()
    node = NodeSession("n1", _hello(b""))
    node.last_seen = 0.0

    service.handle(node, StartedReport("unknown-job", 1))
    service.handle(node, ChunkReport("unknown-job", 1, "text", 1, 3))

    # A sign of life all the same; nothing goes back to the node.
    assert node.last_seen > 0.0
    assert node.outbox.empty()
