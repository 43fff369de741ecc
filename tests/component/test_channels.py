"""core/channels.py's channels and servers on loopback: a channel spreads its calls
over every address of its target, reaches a server restarted on the same port
through the same channel, and a server's old connection sends new calls to a new
one while the calls still open on it run on: an agent's session, cloud's job
stream to the network and a streamed completion outlive many connection ages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from core import channels
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import free_port, running_platform

PEER = "/test.Peers/Peer"
FOLLOW = "/test.Peers/Follow"


@dataclass
class Peers:
    """A server answering which port it serves and which client connection called."""

    port: int
    max_connection_age_ms: int = channels.MAX_CONNECTION_AGE_MS
    # Each message set here is sent on every open Follow stream.
    sent: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def answer(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return f"{self.port} {context.peer()}".encode()

    async def peer(self, _: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return self.answer(context)

    async def follow(
        self, _: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        yield self.answer(context)
        while True:
            yield await self.sent.get()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        server = channels.server(max_connection_age_ms=self.max_connection_age_ms)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Peers",
                    {
                        "Peer": grpc.unary_unary_rpc_method_handler(self.peer),
                        "Follow": grpc.unary_stream_rpc_method_handler(self.follow),
                    },
                )
            ]
        )
        assert channels.listen(server, f"127.0.0.1:{self.port}") == self.port
        await server.start()
        try:
            yield
        finally:
            await server.stop(None)


def _peer(channel: grpc.aio.Channel) -> Callable[[], asyncio.Future[bytes]]:
    call = channel.unary_unary(PEER)
    return lambda: call(b"")  # type: ignore[no-any-return]


async def test_a_channel_spreads_its_calls_over_every_address_of_its_target() -> None:
    first, second = Peers(free_port()), Peers(free_port())
    async with first.serving(), second.serving():
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        async with channels.channel(target) as channel:
            peer = _peer(channel)
            answered: set[int] = set()
            # round_robin takes an address once it connected: the timeout only
            # bounds a channel that sends every call to one of them.
            async with asyncio.timeout(10):
                while len(answered) < 2:
                    answered.add(int((await peer()).split()[0]))
    assert answered == {first.port, second.port}


async def _answer(peer: Callable[[], asyncio.Future[bytes]]) -> bytes | None:
    """The server's answer, or None where the channel has no connection to it."""
    try:
        return await peer()
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


async def test_a_channel_reaches_a_server_restarted_on_its_port() -> None:
    peers = Peers(free_port())
    async with channels.channel(f"127.0.0.1:{peers.port}") as channel:
        peer = _peer(channel)
        async with peers.serving():
            assert await _answer(peer) is not None
        # Down through several of the channel's reconnect attempts, each failed.
        await asyncio.sleep(3 * channels.RECONNECT_BACKOFF_MAX_MS / 1000)
        assert await _answer(peer) is None
        async with peers.serving():
            # The same channel, no new one: calls fail fast until its next attempt
            # connects. The timeout only bounds a channel that does not come back.
            async with asyncio.timeout(10):
                while await _answer(peer) is None:  # noqa: ASYNC110 - polls the server
                    await asyncio.sleep(0.05)


async def test_an_old_connection_moves_new_calls_and_runs_open_ones_to_their_end() -> None:
    peers = Peers(free_port(), max_connection_age_ms=200)
    async with peers.serving(), channels.channel(f"127.0.0.1:{peers.port}") as channel:
        stream: grpc.aio.UnaryStreamCall[bytes, bytes] = channel.unary_stream(FOLLOW)(b"")
        first = await stream.read()
        assert isinstance(first, bytes)
        peer = _peer(channel)
        # Past its age the server told the connection to go: a new call opens
        # another (another client port). The timeout only bounds a broken test.
        async with asyncio.timeout(10):
            while (await peer()) == first:  # noqa: ASYNC110 - polls the server
                await asyncio.sleep(0.05)
        # Many ages later the stream on the old connection still runs.
        await asyncio.sleep(1.0)
        peers.sent.put_nowait(b"still here")
        assert await stream.read() == b"still here"
        stream.cancel()


async def test_sessions_and_streams_outlive_many_connection_ages(postgres_dsn: str) -> None:
    age_ms = 100
    script = " ".join(f"w{i}" for i in range(100))
    runtime = ScriptedRuntime(script=script, token_delay_s=0.01)
    params = pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hello there")],
    )
    async with running_platform(postgres_dsn, max_connection_age_ms=age_ms) as platform:
        agent = await platform.start_agent(runtime, "node")
        customer = await platform.customer(credits=1_000_000)
        for request in range(2):
            # Each streams over about ten ages; between them, the agent's session
            # and every connection grow older still.
            parts = [
                message.choices[0].content
                async for message in platform.inference.StreamChatCompletion(
                    pb.StreamChatCompletionRequest(params=params), metadata=customer.metadata
                )
                if message.choices
            ]
            assert "".join(parts) == script
            await asyncio.sleep(5 * age_ms / 1000)
            # One run each, on the one session: none was cut and continued.
            assert len(runtime.started_jobs) == request + 1
        assert agent.session.connected.is_set()
