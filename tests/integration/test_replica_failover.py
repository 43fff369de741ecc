"""Two network replicas sharing presence in Redis (and their state in PostgreSQL),
agents on each, account and cloud, every one its own OS process; cloud dispatches
through replica A.

Streams through replica A reach nodes replica B owns; when B is killed (SIGKILL)
mid-stream, every client still gets exactly the text of an uninterrupted run,
B's agents re-home to A, and each request is billed once for what it received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from resultity.cloud.v1 import inference_service_pb2 as cloud_pb
from resultity.cloud.v1 import inference_service_pb2_grpc as cloud_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from core import channels
from server.network.catalog import SMOLLM2_135M
from tests.integration.scaled_out import scaled_out

pytestmark = pytest.mark.integration

SCRIPT = " ".join(f"w{i}" for i in range(120))
PRICE = SMOLLM2_135M.price
A, B = 0, 1


@dataclass
class Stream:
    """One greedy streamed chat completion through cloud."""

    parts: list[str] = field(default_factory=list)
    usage: common_pb.Usage | None = None

    async def run(self, cloud: str, api_key: str) -> None:
        params = cloud_pb.ChatCompletionParams(
            model=SMOLLM2_135M.id,
            messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
            temperature=0.0,
        )
        async with channels.insecure_channel(cloud) as channel:
            call = cloud_grpc.InferenceServiceStub(channel).StreamChatCompletion(
                cloud_pb.StreamChatCompletionRequest(params=params),
                metadata=(("authorization", f"Bearer {api_key}"),),
            )
            async for message in call:
                if message.HasField("usage"):
                    self.usage = message.usage
                if message.choices and message.choices[0].content:
                    self.parts.append(message.choices[0].content)


async def until(
    condition: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float = 120.0,
    streams: Sequence[asyncio.Task[None]] = (),
) -> None:
    """Waits until ``condition`` returns true (RPC errors: not yet); the timeout bounds
    a broken test. A stream of ``streams`` that fails meanwhile fails the wait with
    its error rather than leaving it to time out."""
    async with asyncio.timeout(timeout_s):
        while True:
            for stream in streams:
                if stream.done():
                    stream.result()
            try:
                if await condition():
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)


async def test_killed_replica_streams_continue_agents_rehome_billed_once(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with scaled_out(
        tmp_path, database_url, redis_url, networks=2, replicas=1, cloud_networks=(A,)
    ) as platform:
        for name in ("b1", "b2"):
            await platform.agent(name, homes=(B, A), script=SCRIPT, token_delay_s=0.05, slots=1)
        for name in ("a1", "a2"):
            await platform.agent(name, homes=(A, B), script=SCRIPT, token_delay_s=0.05, slots=1)

        async def placed() -> bool:
            on_a, on_b = await platform.nodes_of(A), await platform.nodes_of(B)
            return len(on_a) == len(on_b) == 2 and await platform.ready_nodes(A) == 4

        # Each replica validates its own nodes; A routes over all four once B's
        # presence has reached it.
        await until(placed)
        customer = await platform.customer(credits=10_000_000)
        streams = [Stream() for _ in range(4)]
        tasks = [asyncio.create_task(s.run(platform.clouds[0], customer.api_key)) for s in streams]

        async def b_busy() -> bool:
            # At least two: a canary, or a pick made before A saw a node's load, may
            # put one more there.
            return sum(n.active_jobs for n in await platform.nodes_of(B)) >= 2

        async def all_streaming() -> bool:
            return all(len(s.parts) >= 5 for s in streams)

        await until(b_busy, streams=tasks)
        await until(all_streaming, streams=tasks)
        await platform.processes.kill("network-1")

        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        for stream in streams:
            assert "".join(stream.parts) == SCRIPT
            assert stream.usage is not None
            assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (4, 120)

        async def rehomed() -> bool:
            names = {n.node_name for n in await platform.nodes_of(A)}
            return names == {"a1", "a2", "b1", "b2"}

        await until(rehomed)

        async def settled() -> bool:
            return not (await platform.balance(customer.account_id)).held_micro_credits

        await until(settled)
        balance = await platform.balance(customer.account_id)
        charge = 4 * PRICE.prompt + 120 * PRICE.completion
        assert 10_000_000 - balance.available_micro_credits == 4 * charge
