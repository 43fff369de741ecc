"""`python -m bench.gateway`: the platform's own overhead per streamed request.

Streamed chat completions of ``--tokens`` tokens through the real HTTP
gateway (uvicorn) → cloud → network → one agent (AgentSession over gRPC,
default token batching) whose runtime generates instantly (bench/paced_runtime.py with no pace),
with the account layer holding and settling every request in PostgreSQL;
against a floor measured in the same run: a bare ``grpc.aio`` server-streaming
call that streams the same number of messages. Both at 1, 16, 64 and 256
concurrent streams; each level runs for ``--seconds`` (or ``--max-requests``).

Each server side runs in its own child process (spawned), the load generator
in this one, so client work is not charged to the server's event loop. The
database is the one RESULTITY_DATABASE_URL names (a scratch database is created
on that server and dropped afterwards), or an embedded PostgreSQL. Method and
results: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import httpx
import psutil
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc

from agent.session import AgentSession, SessionSettings
from bench.paced_runtime import MODEL_ID, PacedRuntime
from bench.platform_process import free_port
from gateway.app import create_app
from gateway.server import serve
from server.account.authz import service_metadata
from server.account.component import AccountComponent
from server.cloud.component import CloudComponent
from server.cloud.rate_limits import RateLimitSettings
from server.common import channels
from server.common.database import EmbeddedPostgres
from server.common.logging import configure_logging
from server.network.component import NetworkComponent
from server.network.service import ValidationSettings
from server.secrets import PlatformSecrets

LEVELS = (1, 16, 64, 256)
FLOOR_METHOD = "/bench.Echo/Stream"
FLOOR_PIECE = b" tok"
CREDITS = 10**12  # micro-credits: far more than a run spends
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0
WARM_UP_S = 1.0
WARM_UP_STREAMS = 16


# --- server sides (each in a spawned child process) -------------------------


async def _until_stopped(conn: Connection) -> None:
    await asyncio.to_thread(conn.recv)


async def _serve_floor(conn: Connection, tokens: int) -> None:
    """A bare grpc.aio server: one server-streaming method that sends ``tokens`` messages."""

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        for _ in range(tokens):
            yield FLOOR_PIECE

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        conn.send(("ready", f"127.0.0.1:{port}", ""))
        await _until_stopped(conn)
    finally:
        await server.stop(None)


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def _scratch_database() -> AsyncIterator[str]:
    """A new database on RESULTITY_DATABASE_URL's server (or an embedded one), dropped after."""
    base = os.environ.get("RESULTITY_DATABASE_URL")
    async with contextlib.AsyncExitStack() as stack:
        if base is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="resultity-bench-"))
            embedded = EmbeddedPostgres(Path(tmp) / "pg")
            base = await embedded.start("postgres")
            stack.push_async_callback(embedded.stop)
        scratch = f"resultity_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(base)
        stack.push_async_callback(admin.close)
        await admin.execute(f'CREATE DATABASE "{scratch}"')
        try:
            yield _with_database(base, scratch)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


async def _customer_key(channel: grpc.aio.Channel, service: tuple[tuple[str, str], ...]) -> str:
    account = (
        await account_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb.CreateAccountRequest(name="bench-customer"), metadata=service
        )
    ).account
    await ledger_grpc.LedgerServiceStub(channel).TopUp(
        ledger_pb.TopUpRequest(
            account_id=account.account_id,
            amount_micro_credits=CREDITS,
            idempotency_key=uuid.uuid4().hex,
        ),
        metadata=service,
    )
    key = await keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
        keys_pb.CreateApiKeyRequest(account_id=account.account_id, name="bench"),
        metadata=service,
    )
    return key.secret


async def _node_token(channel: grpc.aio.Channel, service: tuple[tuple[str, str], ...]) -> str:
    account = (
        await account_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb.CreateAccountRequest(name="bench-operator"), metadata=service
        )
    ).account
    token = await node_token_grpc.NodeTokenServiceStub(channel).CreateNodeToken(
        node_token_pb.CreateNodeTokenRequest(account_id=account.account_id, name="bench-node"),
        metadata=service,
    )
    return token.secret


async def _eventually(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls state owned by other tasks
            await asyncio.sleep(0.01)


async def _serve_platform(conn: Connection, tokens: int) -> None:
    """Account, network and cloud on one gRPC server (as `resultity up` runs them),
    one agent with the zero runtime, and the HTTP gateway; all in this process."""
    async with contextlib.AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(_scratch_database())
        server = channels.server()
        port = server.add_insecure_port("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        secrets = PlatformSecrets.generate()
        account = await AccountComponent.start(dsn, secrets)
        stack.push_async_callback(account.stop)
        network = NetworkComponent(
            # The zero runtime does not answer canaries; see bench/README.md.
            validation=ValidationSettings(enabled=False),
            account_target=target,
            service_token=secrets.service_token,
        )
        stack.push_async_callback(network.stop)
        cloud = CloudComponent(
            account_target=target,
            network_target=target,
            service_token=secrets.service_token,
            rate_limits=RateLimitSettings(
                key_requests_per_minute=None,
                key_tokens_per_minute=None,
                key_concurrent_requests=None,
                account_requests_per_minute=None,
                account_tokens_per_minute=None,
                account_concurrent_requests=None,
            ),
        )
        stack.push_async_callback(cloud.stop)
        for component in (account, network, cloud):
            component.register(server)
        network.start()
        await server.start()
        stack.push_async_callback(server.stop, None)
        channel = channels.insecure_channel(target)
        stack.push_async_callback(channel.close, None)
        service = service_metadata(secrets.service_token)

        session = AgentSession(
            SessionSettings(
                network=target,
                node_name="bench-node",
                node_token=await _node_token(channel, service),
            ),
            PacedRuntime(interval_s=0.0, tokens=tokens, slot_count=1024),
        )
        agent = asyncio.create_task(session.run_forever())
        stack.push_async_callback(_cancel, agent)
        await _eventually(lambda: session.node_id in {n.node_id for n in network.service.nodes()})
        api_key = await _customer_key(channel, service)

        http_port = free_port()
        started = asyncio.Event()
        gateway = asyncio.create_task(
            serve(create_app(target), "127.0.0.1", http_port, started=started)
        )
        stack.push_async_callback(_cancel, gateway)
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait((gateway, waiter), return_when=asyncio.FIRST_COMPLETED)
        if gateway.done():
            gateway.result()  # surfaces a start-up failure
        conn.send(("ready", f"http://127.0.0.1:{http_port}", api_key))
        await _until_stopped(conn)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _server_main(kind: str, conn: Connection, tokens: int) -> None:
    configure_logging("warning")
    serve_side = _serve_platform if kind == "platform" else _serve_floor
    try:
        asyncio.run(serve_side(conn, tokens))
    except BaseException as error:
        with contextlib.suppress(OSError):
            conn.send(("error", repr(error), ""))
        raise


@dataclass
class ServerProcess:
    kind: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    address: str
    api_key: str

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


def _start_server(kind: str, tokens: int) -> ServerProcess:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_server_main, args=(kind, child, tokens), name=f"bench-{kind}", daemon=True
    )
    process.start()
    server = ServerProcess(kind, process, parent, "", "")
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the {kind} side did not start in {START_TIMEOUT_S:.0f} s")
        status, address, api_key = parent.recv()
        if status != "ready":
            raise RuntimeError(f"the {kind} side failed to start: {address}")
    except BaseException:
        server.stop()
        raise
    server.address, server.api_key = address, api_key
    return server


# --- load generator (this process) -------------------------------------------


@dataclass
class Level:
    streams: int
    requests: int
    errors: int
    elapsed_s: float
    latencies_s: list[float]
    chunks: list[int]  # content messages per request as the client saw them
    server_cpu_s: float = 0.0  # the server side's process (user + system), PostgreSQL apart

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1000 / max(self.requests, 1)

    @property
    def per_s(self) -> float:
        return self.requests / self.elapsed_s

    def percentile(self, p: int) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, len(ordered) * p // 100)]


async def _load(
    one: Callable[[], Awaitable[int]], streams: int, seconds: float, max_requests: int
) -> Level:
    """``streams`` workers send requests back to back until the time or the count is up."""
    latencies: list[float] = []
    chunks: list[int] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, issued
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            started = time.perf_counter()
            try:
                count = await one()
            except Exception as error:  # counted and reported, never hidden
                errors += 1
                if errors == 1:
                    print(f"  first error: {error!r}", flush=True)
                continue
            latencies.append(time.perf_counter() - started)
            chunks.append(count)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    return Level(streams, len(latencies), errors, time.perf_counter() - started, latencies, chunks)


def _floor_request(channel: grpc.aio.Channel, tokens: int) -> Callable[[], Awaitable[int]]:
    method = channel.unary_stream(FLOOR_METHOD, None, None)  # bytes as they are

    async def one() -> int:
        count = 0
        async for message in method(b"", timeout=REQUEST_TIMEOUT_S):
            count += 1 if message else 0
        if count != tokens:
            raise RuntimeError(f"floor streamed {count} messages, expected {tokens}")
        return count

    return one


def _platform_request(client: httpx.AsyncClient, tokens: int) -> Callable[[], Awaitable[int]]:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one() -> int:
        content_chunks = 0
        completion_tokens = -1
        done = False
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", ()):
                    if choice.get("delta", {}).get("content"):
                        content_chunks += 1
        if not done or completion_tokens != tokens:
            raise RuntimeError(f"stream ended early: done={done}, tokens={completion_tokens}")
        return content_chunks

    return one


async def _measure(
    floor: ServerProcess,
    platform: ServerProcess,
    tokens: int,
    levels: Sequence[int],
    seconds: float,
    max_requests: int,
) -> list[tuple[Level, Level]]:
    limits = httpx.Limits(
        max_connections=max(levels) + 16, max_keepalive_connections=max(levels) + 16
    )
    async with (
        httpx.AsyncClient(
            base_url=f"{platform.address}/v1",
            headers={"authorization": f"Bearer {platform.api_key}"},
            limits=limits,
            timeout=REQUEST_TIMEOUT_S,
        ) as client,
        grpc.aio.insecure_channel(floor.address) as channel,
    ):
        floor_one = _floor_request(channel, tokens)
        platform_one = _platform_request(client, tokens)
        for one in (floor_one, platform_one):  # unmeasured: connections, caches, JIT-free warm-up
            await _load(one, WARM_UP_STREAMS, WARM_UP_S, max_requests)
        results = []
        for streams in levels:
            floor_level = await _measured(floor, floor_one, streams, seconds, max_requests)
            platform_level = await _measured(platform, platform_one, streams, seconds, max_requests)
            results.append((floor_level, platform_level))
            _print_level(floor_level, platform_level)
        return results


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _measured(
    server: ServerProcess,
    one: Callable[[], Awaitable[int]],
    streams: int,
    seconds: float,
    max_requests: int,
) -> Level:
    process = psutil.Process(server.process.pid)
    before = _cpu_s(process)
    level = await _load(one, streams, seconds, max_requests)
    level.server_cpu_s = _cpu_s(process) - before
    return level


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _print_level(floor: Level, platform: Level) -> None:
    chunks = sorted(platform.chunks)
    print(
        f"streams={platform.streams:>3}  floor {floor.per_s:7.0f} req/s "
        f"p50 {_ms(floor.percentile(50))} p99 {_ms(floor.percentile(99))}  |  "
        f"platform {platform.per_s:6.0f} req/s p50 {_ms(platform.percentile(50))} "
        f"p99 {_ms(platform.percentile(99))}  ({platform.requests} requests, "
        f"{platform.errors} errors, {chunks[len(chunks) // 2] if chunks else 0} content "
        f"chunks per request; server CPU per request: floor {floor.cpu_ms_per_request:.2f} ms, "
        f"platform {platform.cpu_ms_per_request:.2f} ms)",
        flush=True,
    )


def _print_table(results: list[tuple[Level, Level]]) -> None:
    print(
        "\n| streams | floor req/s | floor p50 | floor p99 | platform req/s | platform p50 "
        "| platform p99 | added p50 | added p99 | platform CPU per request |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for floor, platform in results:
        f50, f99 = floor.percentile(50), floor.percentile(99)
        p50, p99 = platform.percentile(50), platform.percentile(99)
        print(
            f"| {platform.streams} | {floor.per_s:.0f} | {_ms(f50)} | {_ms(f99)} "
            f"| {platform.per_s:.0f} | {_ms(p50)} | {_ms(p99)} "
            f"| {_ms(p50 - f50)} | {_ms(p99 - f99)} | {_ms(platform.cpu_ms_per_request / 1000)} |"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per completion")
    parser.add_argument("--seconds", type=float, default=4.0, help="per level and side")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per level and side")
    parser.add_argument(
        "--levels",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=LEVELS,
        help="concurrent streams, comma-separated (default 1,16,64,256)",
    )
    args = parser.parse_args(argv)
    configure_logging("warning")
    print(
        f"gateway overhead: {args.tokens}-token streamed completions, "
        f"{args.seconds:g} s per level and side, levels {','.join(map(str, args.levels))}",
        flush=True,
    )
    servers: list[ServerProcess] = []
    try:
        servers.append(_start_server("floor", args.tokens))
        servers.append(_start_server("platform", args.tokens))
        floor, platform = servers
        results = asyncio.run(
            _measure(floor, platform, args.tokens, args.levels, args.seconds, args.max_requests)
        )
    finally:
        for server in reversed(servers):
            server.stop()
    _print_table(results)


if __name__ == "__main__":
    main()
