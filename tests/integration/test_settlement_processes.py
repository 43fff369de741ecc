"""The account server dies while cloud settles a request; the settlement waits in
RabbitMQ and is applied exactly once when the account server is back.

Account and cloud run as their own OS processes (``resultity account`` and
``resultity cloud``) on real PostgreSQL and RabbitMQ; the network and a scripted
agent run in the test process, as elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc as cloud_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from agent.backoff import Backoff
from agent.session import AgentSession, SessionSettings
from core import channels
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import eventually, free_port, start_network

REPO = Path(__file__).resolve().parents[2]
PRICE = SMOLLM2_135M.price
CREDITS = 1_000_000
# "hello there" is 4 prompt tokens in the scripted runtime, its script 10 tokens.
CHARGE = 4 * PRICE.prompt + 10 * PRICE.completion


class Processes:
    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.running: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *argv: str) -> None:
        self.running[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", *argv, cwd=REPO, env=self._env
        )

    async def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.kill()
        await process.wait()

    async def close(self) -> None:
        for process in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _until_serving(call: Any) -> None:
    async with asyncio.timeout(60):
        while True:
            try:
                await call()
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.2)


async def test_account_down_during_settlement_is_settled_once_when_back(
    database_url: str, amqp_url: str, tmp_path: Path
) -> None:
    dsn = database_url
    network = await start_network(dsn)
    runtime = ScriptedRuntime(token_delay_s=0.3)
    agent = AgentSession(
        SessionSettings(network=network.target, node_name="node"),
        runtime,
        backoff=Backoff(base_s=0.05, cap_s=0.2),
    )
    agent_task = asyncio.create_task(agent.run_forever())
    account_target, cloud_target = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "generated")]),
        "RESULTITY_SERVICE_TOKEN": network.service_token,
    }
    service = (("authorization", f"Bearer {network.service_token}"),)
    account_argv = (
        "account", "--listen", account_target, "--database-url", dsn,
        "--amqp-url", amqp_url, "--data-dir", str(tmp_path),
    )  # fmt: skip
    processes = Processes(env)
    account_channel = channels.insecure_channel(account_target)
    cloud_channel = channels.insecure_channel(cloud_target)
    db = await asyncpg.connect(dsn)
    try:
        await processes.start("account", *account_argv)
        ledger = ledger_grpc.LedgerServiceStub(account_channel)
        summary = ledger_pb.GetLedgerSummaryRequest()
        await _until_serving(lambda: ledger.GetLedgerSummary(summary, metadata=service))
        await processes.start(
            "cloud", "cloud", "--listen", cloud_target, "--account", account_target,
            "--network", network.target, "--database-url", dsn, "--amqp-url", amqp_url,
            "--data-dir", str(tmp_path),
        )  # fmt: skip
        customer = (
            await account_grpc.AccountServiceStub(account_channel).CreateAccount(
                account_pb.CreateAccountRequest(name="customer"), metadata=service
            )
        ).account.account_id
        await ledger.TopUp(
            ledger_pb.TopUpRequest(
                account_id=customer, amount_micro_credits=CREDITS, idempotency_key="top-up"
            ),
            metadata=service,
        )
        key = await keys_grpc.ApiKeyServiceStub(account_channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(account_id=customer, name="test"), metadata=service
        )
        inference = cloud_grpc.InferenceServiceStub(cloud_channel)
        request = pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(
                model=SMOLLM2_135M.id,
                messages=[
                    common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")
                ],
            )
        )
        metadata = (("authorization", f"Bearer {key.secret}"),)
        await _until_serving(
            lambda: inference.ListModels(pb.ListModelsRequest(), metadata=metadata)
        )

        async def complete() -> pb.CreateChatCompletionResponse:
            return await inference.CreateChatCompletion(request, metadata=metadata)

        completion = asyncio.create_task(complete())
        # The hold is taken and the node generates: the account server dies.
        await eventually(lambda: bool(runtime.started_jobs), timeout_s=60)
        await processes.kill("account")

        response = await completion
        assert response.billing.charged_micro_credits == CHARGE
        hold = await db.fetchrow(
            "SELECT id, status FROM transfers WHERE kind = 'hold' AND debit_account_id = "
            "(SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = 'consumer')",
            uuid.UUID(customer),
        )
        assert hold["status"] == "pending"  # nothing applied while the account is down

        await processes.start("account", *account_argv)

        async def settled() -> bool:
            status = await db.fetchval("SELECT status FROM transfers WHERE id = $1", hold["id"])
            return bool(status == "settled")

        async with asyncio.timeout(60):
            while not await settled():  # noqa: ASYNC110 - polls another process's work
                await asyncio.sleep(0.2)
        balance = (
            await ledger.GetBalance(
                ledger_pb.GetBalanceRequest(account_id=customer), metadata=service
            )
        ).balance
        assert (balance.available_micro_credits, balance.held_micro_credits) == (
            CREDITS - CHARGE,
            0,
        )
        captures = await db.fetch(
            "SELECT amount FROM transfers WHERE pending_id = $1 AND kind = 'capture'", hold["id"]
        )
        assert [row["amount"] for row in captures] == [CHARGE]  # the platform's, once
    finally:
        await db.close()
        await processes.close()
        await account_channel.close(grace=None)
        await cloud_channel.close(grace=None)
        agent_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent_task
        await network.stop(None)
