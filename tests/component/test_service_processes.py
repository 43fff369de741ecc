"""Each service run alone as `resultity <service>` reports SERVING on its gRPC health
service and stops cleanly (exit code 0, no traceback) on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import free_port


async def _serving(target: str, process: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(240):
            assert process.returncode is None, "the service exited during start-up"
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.25)
    pytest.fail(f"{target} never reported SERVING")


@pytest.mark.parametrize("service", ["network", "account"])
async def test_a_service_alone_stops_cleanly_on_sigterm(
    service: str, postgres_dsn: str, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        service,
        "--listen",
        target,
        "--data-dir",
        str(tmp_path),
        "--database-url",
        postgres_dsn,
        env={**os.environ, "RESULTITY_REDIS_URL": "", "RESULTITY_AMQP_URL": ""},
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await _serving(target, process)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = (stdout + stderr).decode()
    assert process.returncode == 0, output
    assert "Traceback" not in output
