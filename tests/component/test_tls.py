"""gRPC over TLS with certificates made in the test: an agent verifies the
network's certificate (pinned CA), plaintext and unknown CAs are refused, a
server that requires client certificates (mutual TLS) refuses callers without one,
and the gateway calls every cloud replica over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from resultity.cloud.v1 import inference_service_pb2_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.session import AgentSession, SessionSettings
from core import channels
from core.metadata import bearer_metadata
from gateway.app import create_app
from server.common.credentials import generate_service_token
from server.network.admission import AdmissionSettings
from server.network.component import NetworkComponent
from tests.doubles.scripted_cloud import TEST_API_KEY, ScriptedCloud
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import new_network_id
from tests.tls_support import CertificateAuthority, Issued

SERVICE_TOKEN = generate_service_token()


@contextlib.asynccontextmanager
async def _network(tls: channels.Tls, dsn: str) -> AsyncIterator[str]:
    server = channels.server()
    port = channels.listen(server, "127.0.0.1:0", tls)
    network = NetworkComponent(
        admission=AdmissionSettings(network_id=new_network_id()),
        service_token=SERVICE_TOKEN,
        database_url=dsn,
    )
    await network.start()
    network.register(server)
    await server.start()
    try:
        yield f"localhost:{port}"
    finally:
        await network.stop()
        await server.stop(None)


async def _list_nodes(target: str, tls: channels.Tls) -> list[str]:
    async with channels.channel(target, tls) as channel:
        listing = await admin_grpc.NodeAdminServiceStub(channel).ListNodes(
            admin_pb.ListNodesRequest(), metadata=bearer_metadata(SERVICE_TOKEN), timeout=5
        )
    return [node.node_id for node in listing.nodes]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path)


@pytest.fixture
def server_cert(ca: CertificateAuthority) -> Issued:
    return ca.issue("network", server=True)


async def test_an_agent_joins_a_tls_network_that_it_verifies(
    ca: CertificateAuthority, server_cert: Issued, postgres_dsn: str
) -> None:
    client = channels.Tls(connect=True, ca=ca.cert)
    async with _network(
        channels.Tls(cert=server_cert.cert, key=server_cert.key), postgres_dsn
    ) as target:
        session = AgentSession(SessionSettings(target, "tls", tls=client), ScriptedRuntime())
        task = asyncio.create_task(session.run_forever())
        try:
            async with asyncio.timeout(10):
                await session.connected.wait()
            assert await _list_nodes(target, client) == [session.node_id]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_plaintext_and_unknown_cas_are_refused(
    ca: CertificateAuthority, server_cert: Issued, tmp_path: Path, postgres_dsn: str
) -> None:
    stranger = CertificateAuthority(tmp_path, "stranger-ca")
    async with _network(
        channels.Tls(cert=server_cert.cert, key=server_cert.key), postgres_dsn
    ) as target:
        for client in (channels.PLAINTEXT, channels.Tls(connect=True, ca=stranger.cert)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _list_nodes(target, client)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_of_its_ca(
    ca: CertificateAuthority, server_cert: Issued, tmp_path: Path, postgres_dsn: str
) -> None:
    mutual = channels.Tls(cert=server_cert.cert, key=server_cert.key, client_ca=ca.cert)
    cloud = ca.issue("cloud", server=False)
    outsider = CertificateAuthority(tmp_path, "outsider-ca").issue("intruder", server=False)
    async with _network(mutual, postgres_dsn) as target:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _list_nodes(target, channels.Tls(connect=True, ca=ca.cert))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        intruder = channels.Tls(connect=True, ca=ca.cert, cert=outsider.cert, key=outsider.key)
        with pytest.raises(grpc.aio.AioRpcError):
            await _list_nodes(target, intruder)
        member = channels.Tls(connect=True, ca=ca.cert, cert=cloud.cert, key=cloud.key)
        assert await _list_nodes(target, member) == []


def test_a_certificate_needs_its_key(server_cert: Issued) -> None:
    with pytest.raises(ValueError, match="key"):
        channels.Tls(cert=server_cert.cert)


async def test_a_gateway_calls_every_cloud_replica_over_mutual_tls(
    ca: CertificateAuthority, server_cert: Issued
) -> None:
    mutual = channels.Tls(cert=server_cert.cert, key=server_cert.key, client_ca=ca.cert)
    gateway_cert = ca.issue("gateway", server=False)
    clouds = [ScriptedCloud(), ScriptedCloud()]
    servers: list[grpc.aio.Server] = []
    targets: list[str] = []
    for cloud in clouds:
        server = channels.server()
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(cloud, server)
        targets.append(f"127.0.0.1:{channels.listen(server, '127.0.0.1:0', mutual)}")
        await server.start()
        servers.append(server)
    tls = channels.Tls(connect=True, ca=ca.cert, cert=gateway_cert.cert, key=gateway_cert.key)
    app = create_app(",".join(targets), tls=tls)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://gateway",
                headers={"authorization": f"Bearer {TEST_API_KEY}"},
            ) as http,
        ):
            statuses = [(await http.get("/v1/models")).status_code for _ in range(2)]
    finally:
        for server in servers:
            await server.stop(None)
    assert statuses == [200, 200]
    assert [len(cloud.calls) for cloud in clouds] == [1, 1]
