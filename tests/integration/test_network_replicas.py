"""Two network replicas as separate processes on one PostgreSQL and one Redis: a
configuration change made on one reaches, and is acknowledged by, an agent
connected to the other."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from agent.session import AgentSession, SessionSettings
from core import channels
from core.metadata import bearer_metadata
from server.common.credentials import generate_service_token
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import free_port

START_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def _replica(
    database_url: str, redis_url: str, token: str, data_dir: Path
) -> AsyncIterator[str]:
    """`resultity network` in its own process; yields its address once it answers."""
    target = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "--log-level",
        "warning",
        "network",
        "--listen",
        target,
        "--database-url",
        database_url,
        "--redis-url",
        redis_url,
        "--data-dir",
        str(data_dir),
        env={**os.environ, "RESULTITY_SERVICE_TOKEN": token},
    )
    try:
        await _answering(target, token, process)
        yield target
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _answering(target: str, token: str, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(START_TIMEOUT_S), channels.insecure_channel(target) as channel:
        admin = admin_grpc.NodeAdminServiceStub(channel)
        while True:
            assert process.returncode is None, "the network replica exited"
            try:
                await admin.GetNetworkConfig(
                    admin_pb.GetNetworkConfigRequest(), metadata=bearer_metadata(token)
                )
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)


async def test_a_config_change_on_one_replica_is_acked_by_an_agent_on_the_other(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    token = generate_service_token()
    metadata = bearer_metadata(token)
    async with (
        _replica(database_url, redis_url, token, tmp_path / "a") as first,
        _replica(database_url, redis_url, token, tmp_path / "b") as second,
    ):
        session = AgentSession(SessionSettings(second, "far"), ScriptedRuntime())
        agent = asyncio.create_task(session.run_forever())
        try:
            await session.connected.wait()
            async with channels.insecure_channel(first) as channel:
                admin = admin_grpc.NodeAdminServiceStub(channel)
                get = admin_pb.GetNetworkConfigRequest()
                config = (await admin.GetNetworkConfig(get, metadata=metadata)).config
                config.heartbeat_interval.CopyFrom(duration_pb2.Duration(seconds=3))
                updated = await admin.UpdateNetworkConfig(
                    admin_pb.UpdateNetworkConfigRequest(
                        config=config, expected_version=config.version
                    ),
                    metadata=metadata,
                )
                version = updated.config.version
                # Pushed by the second replica, acknowledged there, listed by the first.
                async with asyncio.timeout(10):
                    while True:
                        listed = await admin.ListConfigAcks(
                            admin_pb.ListConfigAcksRequest(version=version), metadata=metadata
                        )
                        if listed.acks:
                            break
                        await asyncio.sleep(0.05)
            assert [ack.node_id for ack in listed.acks] == [session.node_id]
            assert session.heartbeat_interval_s == 3.0
        finally:
            agent.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent
