"""Two network replicas as separate processes sharing presence in Redis (and their
state in PostgreSQL), agents on each, cloud (with the account layer) dispatching
through replica A.

Streams through replica A reach nodes replica B owns; when B is killed (SIGKILL)
mid-stream, every client still gets exactly the text of an uninterrupted run,
B's agents re-home to A, and each request is billed once for what it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.cloud.v1 import inference_service_pb2 as cloud_pb
from resultity.cloud.v1 import inference_service_pb2_grpc as cloud_grpc
from resultity.common.v1 import inference_pb2 as common_pb
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from resultity.network.v1 import node_admin_service_pb2 as admin_pb
from resultity.network.v1 import node_admin_service_pb2_grpc as admin_grpc

from core import channels
from core.metadata import bearer_metadata
from server.account.component import AccountComponent
from server.cloud.component import CloudComponent
from server.network.catalog import SMOLLM2_135M
from server.secrets import PlatformSecrets
from tests.harness import eventually, free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = " ".join(f"w{i}" for i in range(120))
PRICE = SMOLLM2_135M.price
PRESENCE_KEYS = "resultity:presence:*"


@dataclass
class Processes:
    logs: Path
    env: dict[str, str]
    running: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    async def start(self, name: str, *argv: str) -> asyncio.subprocess.Process:
        with (self.logs / f"{name}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *argv, cwd=REPO, env=self.env, stdout=log, stderr=log
            )
        self.running[name] = process
        return process

    async def network(self, name: str, port: int, database_url: str, redis_url: str) -> None:
        await self.start(
            name,
            *("-m", "server.cli", "network", "--listen", f"127.0.0.1:{port}"),
            *("--replica-id", name, "--data-dir", str(self.logs / name)),
            *("--database-url", database_url, "--redis-url", redis_url),
        )

    async def agent(self, name: str, networks: str) -> None:
        await self.start(
            name,
            *("-m", "tests.doubles.scripted_agent", "--network", networks, "--name", name),
            *("--script", SCRIPT, "--token-delay", "0.05", "--answer-canaries"),
        )

    def kill(self, name: str) -> None:
        os.kill(self.running[name].pid, signal.SIGKILL)

    async def close(self) -> None:
        for process in self.running.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


@dataclass
class Control:
    """Account and cloud in this process; cloud dispatches through replica A."""

    channel: grpc.aio.Channel
    service: tuple[tuple[str, str], ...]

    async def customer(self, credits: int) -> tuple[str, tuple[tuple[str, str], ...]]:
        account = (
            await account_grpc.AccountServiceStub(self.channel).CreateAccount(
                account_pb.CreateAccountRequest(name="customer"), metadata=self.service
            )
        ).account
        await ledger_grpc.LedgerServiceStub(self.channel).TopUp(
            ledger_pb.TopUpRequest(
                account_id=account.account_id,
                amount_micro_credits=credits,
                idempotency_key=uuid.uuid4().hex,
            ),
            metadata=self.service,
        )
        key = await keys_grpc.ApiKeyServiceStub(self.channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(account_id=account.account_id, name="test"),
            metadata=self.service,
        )
        return account.account_id, (("authorization", f"Bearer {key.secret}"),)

    async def balance(self, account_id: str) -> ledger_pb.Balance:
        response = await ledger_grpc.LedgerServiceStub(self.channel).GetBalance(
            ledger_pb.GetBalanceRequest(account_id=account_id), metadata=self.service
        )
        return response.balance


@dataclass
class Stream:
    """One greedy streamed chat completion through cloud."""

    parts: list[str] = field(default_factory=list)
    usage: common_pb.Usage | None = None

    async def run(self, control: Control, key: tuple[tuple[str, str], ...]) -> None:
        params = cloud_pb.ChatCompletionParams(
            model=SMOLLM2_135M.id,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
            temperature=0.0,
        )
        call = cloud_grpc.InferenceServiceStub(control.channel).StreamChatCompletion(
            cloud_pb.StreamChatCompletionRequest(params=params), metadata=key
        )
        async for message in call:
            if message.HasField("usage"):
                self.usage = message.usage
            if message.choices and message.choices[0].content:
                self.parts.append(message.choices[0].content)


async def nodes_of(target: str, service: tuple[tuple[str, str], ...]) -> list[admin_pb.Node]:
    async with channels.insecure_channel(target) as channel:
        response = await admin_grpc.NodeAdminServiceStub(channel).ListNodes(
            admin_pb.ListNodesRequest(), metadata=service
        )
    return list(response.nodes)


async def ready_nodes(target: str, service: tuple[tuple[str, str], ...]) -> int:
    """Nodes replica ``target`` routes to, its own and the other replicas'."""
    async with channels.insecure_channel(target) as channel:
        response = await dispatch_grpc.DispatchServiceStub(channel).ListModels(
            dispatch_pb.ListModelsRequest(), metadata=service
        )
    [model] = [m for m in response.models if m.id == SMOLLM2_135M.id]
    return model.ready_nodes


async def until(condition: object, *, timeout_s: float = 60.0) -> None:
    """Waits until the coroutine function ``condition`` returns true (RPC errors: not yet)."""
    assert callable(condition)
    async with asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                if await condition():
                    return
            await asyncio.sleep(0.2)


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[tuple[Control, PlatformSecrets, int]]:
    secrets = PlatformSecrets.generate()
    network_a = free_port()
    server = channels.server()
    port = server.add_insecure_port("127.0.0.1:0")
    target = f"127.0.0.1:{port}"
    account = await AccountComponent.start(database_url, secrets)
    cloud = await CloudComponent.start(
        database_url,
        account_target=target,
        network_target=f"127.0.0.1:{network_a}",
        service_token=secrets.service_token,
    )
    account.register(server)
    cloud.register(server)
    await server.start()
    channel = channels.insecure_channel(target)
    yield Control(channel, bearer_metadata(secrets.service_token)), secrets, network_a
    await channel.close(grace=None)
    await server.stop(None)
    await cloud.stop()
    await account.stop()


async def test_killed_replica_streams_continue_agents_rehome_billed_once(
    control: tuple[Control, PlatformSecrets, int],
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    platform, secrets, port_a = control
    redis_client = redis.Redis.from_url(redis_url)
    port_b = free_port()
    a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    stale = [key async for key in redis_client.scan_iter(PRESENCE_KEYS)]
    if stale:
        await redis_client.delete(*stale)
    env = {
        **os.environ,
        "RESULTITY_SERVICE_TOKEN": secrets.service_token,
        "PYTHONPATH": f"{REPO}:{REPO / 'generated'}",
    }
    processes = Processes(tmp_path, env)
    service = platform.service
    try:
        await processes.network("replica-a", port_a, database_url, redis_url)
        await processes.network("replica-b", port_b, database_url, redis_url)

        async def serving() -> bool:
            return await nodes_of(a, service) == await nodes_of(b, service) == []

        await until(serving)
        for name in ("b1", "b2"):
            await processes.agent(name, f"{b},{a}")
        for name in ("a1", "a2"):
            await processes.agent(name, f"{a},{b}")

        async def placed() -> bool:
            on_a, on_b = await nodes_of(a, service), await nodes_of(b, service)
            return len(on_a) == 2 and len(on_b) == 2 and await ready_nodes(a, service) == 4

        # Each replica validates its own nodes; A routes over all four once B's
        # presence has reached it.
        await until(placed)
        customer, key = await platform.customer(credits=10_000_000)
        streams = [Stream() for _ in range(4)]
        tasks = [asyncio.create_task(s.run(platform, key)) for s in streams]

        async def b_busy() -> bool:
            return sum(n.active_jobs for n in await nodes_of(b, service)) == 2

        await until(b_busy)
        await eventually(lambda: all(len(s.parts) >= 5 for s in streams), timeout_s=60)
        processes.kill("replica-b")

        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        for stream in streams:
            assert "".join(stream.parts) == SCRIPT
            assert stream.usage is not None
            assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (4, 120)

        async def rehomed() -> bool:
            return {n.node_name for n in await nodes_of(a, service)} == {"a1", "a2", "b1", "b2"}

        await until(rehomed)
        balance = await platform.balance(customer)
        assert balance.held_micro_credits == 0
        charge = 4 * PRICE.prompt + 120 * PRICE.completion
        assert 10_000_000 - balance.available_micro_credits == 4 * charge
    finally:
        await processes.close()
        leftover = [key async for key in redis_client.scan_iter(PRESENCE_KEYS)]
        if leftover:
            await redis_client.delete(*leftover)
        await redis_client.aclose()
