"""The control plane scaled out on this machine, every service its own OS process:
one account and one network server, cloud and gateway replicas (gateway i calls
cloud i), and a scripted agent; what replicas share lives in one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import rate_limits_pb2 as rate_limits_pb

from core import channels
from core.metadata import bearer_metadata
from server.common.credentials import generate_service_token
from server.network.catalog import SMOLLM2_135M
from tests.harness import free_port

REPO = Path(__file__).resolve().parents[2]
# Cloud replicas trust cached keys this long: a key refused sooner was refused
# because an invalidation reached the replica, not because its entry expired.
CACHE_TTL_S = "3600"
READY_TIMEOUT_S = 60.0


@dataclass
class Processes:
    """Started processes, their output in ``logs``; ended with SIGTERM, then SIGKILL."""

    logs: Path
    started: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def spawn(self, name: str, *argv: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        log = (self.logs / f"{name}.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        finally:
            log.close()
        self.started.append(process)
        return process

    async def close(self) -> None:
        for process in reversed(self.started):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                await asyncio.wait_for(process.wait(), timeout=15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_until_listening(port: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"process on port {port} exited with {process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return


@dataclass
class Customer:
    account_id: str
    api_key: str
    api_key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


@dataclass
class ScaledOut:
    account: str
    network: str
    clouds: list[str]
    gateways: list[str]
    service_token: str
    processes: Processes

    @property
    def service(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.service_token)

    async def customer(
        self, credits: int, limits: rate_limits_pb.RateLimits | None = None
    ) -> Customer:
        async with channels.insecure_channel(self.account) as channel:
            account = (
                await account_grpc.AccountServiceStub(channel).CreateAccount(
                    account_pb.CreateAccountRequest(name="customer"), metadata=self.service
                )
            ).account
            await ledger_grpc.LedgerServiceStub(channel).TopUp(
                ledger_pb.TopUpRequest(
                    account_id=account.account_id,
                    amount_micro_credits=credits,
                    idempotency_key=uuid.uuid4().hex,
                ),
                metadata=self.service,
            )
            issued = await keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
                keys_pb.CreateApiKeyRequest(
                    account_id=account.account_id, name="test", rate_limits=limits
                ),
                metadata=self.service,
            )
        return Customer(account.account_id, issued.secret, issued.api_key.api_key_id)

    async def balance(self, customer: Customer) -> ledger_pb.Balance:
        async with channels.insecure_channel(self.account) as channel:
            response = await ledger_grpc.LedgerServiceStub(channel).GetBalance(
                ledger_pb.GetBalanceRequest(account_id=customer.account_id),
                metadata=self.service,
            )
        return response.balance

    async def revoke(self, customer: Customer) -> None:
        async with channels.insecure_channel(self.account) as channel:
            await keys_grpc.ApiKeyServiceStub(channel).RevokeApiKey(
                keys_pb.RevokeApiKeyRequest(api_key_id=customer.api_key_id),
                metadata=self.service,
            )

    async def wait_until_serving(self, http: httpx.AsyncClient) -> None:
        """Until every gateway lists the model: the agent passed validation."""
        probe = await self.customer(credits=1)
        async with asyncio.timeout(READY_TIMEOUT_S):
            for gateway in self.gateways:
                while True:
                    response = await http.get(f"{gateway}/v1/models", headers=probe.headers)
                    if response.status_code == 200 and response.json()["data"]:
                        break
                    await asyncio.sleep(0.2)


def _environment(service_token: str, redis_url: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RESULTITY_RATE_LIMIT_", "RESULTITY_CLOUD_"))
    }
    env.update(
        RESULTITY_SERVICE_TOKEN=service_token,
        RESULTITY_KEY_HASH_SECRET=secrets.token_hex(32),
        RESULTITY_REDIS_URL=redis_url,
        RESULTITY_CLOUD_CACHE_TTL_S=CACHE_TTL_S,
        PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "generated"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    return env


@contextlib.asynccontextmanager
async def scaled_out(
    logs: Path, database_url: str, redis_url: str, *, replicas: int = 2
) -> AsyncIterator[ScaledOut]:
    service_token = generate_service_token()
    env = _environment(service_token, redis_url)
    processes = Processes(logs)
    cli = (sys.executable, "-m", "server.cli", "--log-level", "warning")
    ports = {"account": free_port(), "network": free_port()}
    try:
        account = await processes.spawn(
            "account",
            *cli,
            "account",
            "--listen",
            f"127.0.0.1:{ports['account']}",
            "--database-url",
            database_url,
            "--data-dir",
            str(logs / "account"),
            env=env,
        )
        network = await processes.spawn(
            "network",
            *cli,
            "network",
            "--listen",
            f"127.0.0.1:{ports['network']}",
            "--database-url",
            database_url,
            "--data-dir",
            str(logs / "network"),
            env=env,
        )
        await wait_until_listening(ports["account"], account)
        await wait_until_listening(ports["network"], network)
        clouds, gateways = [], []
        for index in range(replicas):
            cloud_port, gateway_port = free_port(), free_port()
            cloud = await processes.spawn(
                f"cloud-{index}",
                *cli,
                "cloud",
                "--listen",
                f"127.0.0.1:{cloud_port}",
                "--account",
                f"127.0.0.1:{ports['account']}",
                "--network",
                f"127.0.0.1:{ports['network']}",
                "--database-url",
                database_url,
                "--data-dir",
                str(logs / f"cloud-{index}"),
                env=env,
            )
            await wait_until_listening(cloud_port, cloud)
            gateway = await processes.spawn(
                f"gateway-{index}",
                *cli,
                "gateway",
                "--cloud",
                f"127.0.0.1:{cloud_port}",
                "--port",
                str(gateway_port),
                env=env,
            )
            await wait_until_listening(gateway_port, gateway)
            clouds.append(f"127.0.0.1:{cloud_port}")
            gateways.append(f"http://127.0.0.1:{gateway_port}")
        await processes.spawn(
            "agent",
            sys.executable,
            "-m",
            "tests.doubles.scripted_agent",
            "--network",
            f"127.0.0.1:{ports['network']}",
            "--name",
            "node",
            "--slots",
            "4",
            "--answer-canaries",
            env=env,
        )
        yield ScaledOut(
            f"127.0.0.1:{ports['account']}",
            f"127.0.0.1:{ports['network']}",
            clouds,
            gateways,
            service_token,
            processes,
        )
    finally:
        await processes.close()


def chat_request(max_tokens: int = 2) -> dict[str, object]:
    return {
        "model": SMOLLM2_135M.id,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }


def cost(usage: dict[str, int]) -> int:
    """What the catalog price makes of a response's usage, in micro-credits."""
    price = SMOLLM2_135M.price
    return usage["prompt_tokens"] * price.prompt + usage["completion_tokens"] * price.completion
