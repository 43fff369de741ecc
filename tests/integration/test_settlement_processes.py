"""The account server dies while cloud settles a request; the settlement waits in
RabbitMQ and is applied exactly once when the account server is back.

Account, network, cloud and a scripted agent run as their own OS processes on
real PostgreSQL, Redis and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc as cloud_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from core import channels
from server.network.catalog import SMOLLM2_135M
from tests.integration.scaled_out import scaled_out

pytestmark = pytest.mark.integration

PRICE = SMOLLM2_135M.price
CREDITS = 1_000_000
# "hello there" is 4 prompt tokens in the scripted runtime, its script 10 tokens.
CHARGE = 4 * PRICE.prompt + 10 * PRICE.completion


async def _until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Polls another process's work; the timeout bounds a broken test."""
    async with asyncio.timeout(120):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.2)


async def test_account_down_during_settlement_is_settled_once_when_back(
    database_url: str, redis_url: str, amqp_url: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(database_url)
    try:
        async with scaled_out(
            tmp_path, database_url, redis_url, replicas=1, amqp_url=amqp_url
        ) as platform:
            await platform.agent("node", token_delay_s=0.3, slots=1)
            async with httpx.AsyncClient(timeout=30) as http:
                await platform.wait_until_serving(http)
            customer = await platform.customer(credits=CREDITS)
            request = pb.CreateChatCompletionRequest(
                params=pb.ChatCompletionParams(
                    model=SMOLLM2_135M.id,
                    messages=[
                        common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")
                    ],
                )
            )
            async with channels.insecure_channel(platform.clouds[0]) as channel:
                completion = cloud_grpc.InferenceServiceStub(channel).CreateChatCompletion(
                    request, metadata=customer.metadata
                )

                async def generating() -> bool:
                    if completion.done():  # too soon: its answer, or error, says why
                        raise AssertionError(await completion)
                    return any(node.active_jobs for node in await platform.nodes_of(0))

                # The hold is taken and the node generates: the account server dies.
                await _until(generating)
                await platform.processes.kill("account-0")
                response = await completion
            assert response.billing.charged_micro_credits == CHARGE
            hold = await db.fetchrow(
                "SELECT id, status FROM transfers WHERE kind = 'hold' AND debit_account_id = "
                "(SELECT id FROM ledger_accounts WHERE owner_id = $1 AND kind = 'consumer')",
                uuid.UUID(customer.account_id),
            )
            assert hold is not None
            assert hold["status"] == "pending"  # nothing applied while the account is down

            await platform.restart("account-0")

            async def settled() -> bool:
                status = await db.fetchval("SELECT status FROM transfers WHERE id = $1", hold["id"])
                return bool(status == "settled")

            await _until(settled)
            balance = await platform.balance(customer.account_id)
            assert (balance.available_micro_credits, balance.held_micro_credits) == (
                CREDITS - CHARGE,
                0,
            )
            captures = await db.fetch(
                "SELECT amount FROM transfers WHERE pending_id = $1 AND kind = 'capture'",
                hold["id"],
            )
            # One settlement applied once: the operator's share and the platform's.
            assert len(captures) == 2
            assert sum(row["amount"] for row in captures) == CHARGE
    finally:
        await db.close()
