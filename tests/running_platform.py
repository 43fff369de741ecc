"""`resultity up` as users start it, as a subprocess against the test database:
the fixture the end-to-end tests (tests/e2e) and the browser tests (tests/browser)
share."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.cloud.v1 import inference_service_pb2 as cloud_pb
from resultity.cloud.v1 import inference_service_pb2_grpc as cloud_grpc

from tests.harness import free_port

MODEL = "smollm2-135m-instruct"
START_TIMEOUT_S = 240


@dataclass
class RunningPlatform:
    process: asyncio.subprocess.Process
    base_url: str
    grpc_target: str
    api_key: str
    service_token: str
    data_dir: Path

    def client(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or self.api_key,
            max_retries=0,
            _strict_response_validation=True,
        )

    async def balance(self) -> int:
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            # Only the platform's services may authenticate keys.
            key = await keys_grpc.ApiKeyServiceStub(channel).AuthenticateApiKey(
                keys_pb.AuthenticateApiKeyRequest(secret=self.api_key),
                metadata=(("authorization", f"Bearer {self.service_token}"),),
            )
            # The demo key has the management scope: it may read its own balance.
            response = await ledger_grpc.LedgerServiceStub(channel).GetBalance(
                ledger_pb.GetBalanceRequest(account_id=key.api_key.account_id),
                metadata=(("authorization", f"Bearer {self.api_key}"),),
            )
        assert response.balance.held_micro_credits == 0
        return response.balance.available_micro_credits

    async def price(self) -> cloud_pb.Model:
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            models = await cloud_grpc.InferenceServiceStub(channel).ListModels(
                cloud_pb.ListModelsRequest(),
                metadata=(("authorization", f"Bearer {self.api_key}"),),
            )
        return next(model for model in models.models if model.id == MODEL)


async def _wait_until_serving(
    data_dir: Path, base_url: str, process: asyncio.subprocess.Process
) -> str:
    key_file = data_dir / "demo-api-key"
    async with asyncio.timeout(START_TIMEOUT_S), httpx.AsyncClient() as http:
        while True:
            assert process.returncode is None, "resultity up exited during start-up"
            if key_file.exists():
                key = key_file.read_text().strip()
                try:
                    models = await http.get(
                        f"{base_url}/models", headers={"authorization": f"Bearer {key}"}
                    )
                    if models.status_code == 200 and models.json()["data"]:
                        return key
                except httpx.TransportError:
                    pass
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
async def platform(
    postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningPlatform]:
    data_dir = tmp_path_factory.mktemp("platform")
    http_port, grpc_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "up",
        "--data-dir",
        str(data_dir),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--database-url",
        postgres_dsn,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base_url = f"http://127.0.0.1:{http_port}/v1"
    try:
        key = await _wait_until_serving(data_dir, base_url, process)
        service_token = (data_dir / "service-token").read_text().strip()
        yield RunningPlatform(
            process, base_url, f"127.0.0.1:{grpc_port}", key, service_token, data_dir
        )
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(60):
                await process.wait()
    assert process.returncode == 0, "resultity up did not shut down cleanly on SIGINT"
