"""The server sides of `python -m bench.gateway`, each in its own spawned process.

- *floor*: a bare ``grpc.aio`` server with one server-streaming method;
- *platform*: account, network and cloud on one gRPC server and the HTTP gateway,
  as `resultity up` runs them in one process;
- *agent*: the platform's one node (AgentSession over gRPC, the zero runtime),
  in a process of its own, as `resultity up` runs its local agent.

An *observed* platform (``OBSERVED`` among its arguments, then an OTLP endpoint
or "") counts into a Prometheus registry as `resultity up` does and, given an
endpoint, traces every request to it; so does its agent.

Each reports ("ready", address, secret) on its pipe (the platform adds its
PostgreSQL database's name), or ("error", repr, ""), and
stops when the parent sends anything. The platform side first asks for its agent
with ("agent", network target, node token) and is ready once that node registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import grpc
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
from agent.telemetry import AgentMetrics
from bench.paced_runtime import PacedRuntime, canary_answers
from bench.processes import free_port
from bench.scratch_database import scratch_database
from core import channels, event_loop, tracing
from core.grpc_metrics import GrpcServerMetrics
from core.logging import configure_logging
from core.metadata import bearer_metadata
from core.metrics import NO_METRICS, MetricsFactory
from core.prometheus import PrometheusMetrics
from gateway.app import create_app
from gateway.server import serve
from server.account.component import AccountComponent
from server.cloud.component import CloudComponent
from server.cloud.settings import RateLimitSettings
from server.network.component import NetworkComponent
from server.network.service import ValidationSettings
from server.secrets import PlatformSecrets

FLOOR_METHOD = "/bench.Echo/Stream"
# A side's argument: metrics and tracing on (the OTLP endpoint follows).
OBSERVED = "observed"
FLOOR_PIECE = b" tok"
CREDITS = 10**12  # micro-credits: far more than a run spends
START_TIMEOUT_S = 120.0


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


async def create_customer_key(
    channel: grpc.aio.Channel, service: tuple[tuple[str, str], ...]
) -> str:
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


async def create_node_token(channel: grpc.aio.Channel, service: tuple[tuple[str, str], ...]) -> str:
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


async def _serve_platform(conn: Connection, tokens: int, *observed: str) -> None:
    """Account, network and cloud on one gRPC server and the HTTP gateway, in this
    process (as `resultity up` runs them); the node is the agent side's."""
    prometheus = _observe("platform", observed)
    metrics: MetricsFactory = prometheus or NO_METRICS
    async with contextlib.AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(scratch_database())
        server = channels.server([GrpcServerMetrics(metrics)] if prometheus else [])
        port = server.add_insecure_port("127.0.0.1:0")
        target = f"127.0.0.1:{port}"
        secrets = PlatformSecrets.generate()
        account = await AccountComponent.start(dsn, secrets, metrics=metrics)
        stack.push_async_callback(account.stop)
        network = NetworkComponent(
            # The zero runtime does not answer canaries; see bench/README.md.
            validation=ValidationSettings(enabled=False),
            account_target=target,
            service_token=secrets.service_token,
            database_url=dsn,
            metrics=metrics,
        )
        await network.start()
        stack.push_async_callback(network.stop)
        cloud = await CloudComponent.start(
            dsn,
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
            metrics=metrics,
        )
        stack.push_async_callback(cloud.stop)
        for component in (account, network, cloud):
            component.register(server)
        await server.start()
        stack.push_async_callback(server.stop, None)
        channel = channels.insecure_channel(target)
        stack.push_async_callback(channel.close, None)
        service = bearer_metadata(secrets.service_token)

        conn.send(("agent", target, await create_node_token(channel, service), *observed))
        await _eventually(lambda: bool(network.service.nodes()), timeout_s=START_TIMEOUT_S)
        api_key = await create_customer_key(channel, service)

        http_port = free_port()
        started = asyncio.Event()
        gateway = asyncio.create_task(
            serve(create_app(target, metrics=prometheus), "127.0.0.1", http_port, started=started)
        )
        stack.push_async_callback(_cancel, gateway)
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait((gateway, waiter), return_when=asyncio.FIRST_COMPLETED)
        if gateway.done():
            gateway.result()  # surfaces a start-up failure
        conn.send(("ready", f"http://127.0.0.1:{http_port}", api_key, urlsplit(dsn).path[1:]))
        await _until_stopped(conn)


async def _serve_agent(
    conn: Connection, tokens: int, network: str, node_token: str, *observed: str
) -> None:
    """The platform's node: default token batching, a runtime that generates instantly
    and slots enough that jobs never wait for one; it answers a validating network's
    canaries."""
    prometheus = _observe("agent", observed)
    session = AgentSession(
        SessionSettings(network=network, node_name="bench-node", node_token=node_token),
        PacedRuntime(interval_s=0.0, tokens=tokens, slot_count=1024, answers=canary_answers()),
        metrics=AgentMetrics(prometheus) if prometheus else None,
    )
    agent = asyncio.create_task(session.run_forever())
    try:
        await session.connected.wait()
        conn.send(("ready", session.node_id or "", ""))
        await _until_stopped(conn)
    finally:
        await _cancel(agent)


def _observe(service: str, observed: tuple[str, ...]) -> PrometheusMetrics | None:
    """For an observed side: its metrics registry, and tracing to its endpoint if any."""
    if not observed:
        return None
    _, endpoint = observed
    if endpoint:
        tracing.configure_tracing(service, {tracing.ENDPOINT_ENV: endpoint})
    return PrometheusMetrics()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _side_main(kind: str, conn: Connection, tokens: int, *args: str) -> None:
    configure_logging("warning")
    sides: dict[str, Callable[..., Coroutine[Any, Any, None]]] = {
        "floor": _serve_floor,
        "platform": _serve_platform,
        "agent": _serve_agent,
    }
    serve_side = sides[kind]
    try:
        # The event loop `resultity up` runs on, for every side.
        event_loop.run(serve_side(conn, tokens, *args))
    except BaseException as error:
        with contextlib.suppress(OSError):
            conn.send(("error", repr(error), ""))
        raise
    finally:
        tracing.shutdown_tracing()


@dataclass
class ServerProcess:
    kind: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    address: str = ""
    secret: str = ""  # the platform's customer API key
    database: str = ""  # the platform's PostgreSQL database
    agent: ServerProcess | None = None  # the platform's node
    psutil_process: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.psutil_process = psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        """User + system CPU seconds of this side's process so far."""
        times = self.psutil_process.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        with contextlib.suppress(OSError):
            self.conn.send("stop")
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


def start_side(kind: str, tokens: int, *args: str) -> ServerProcess:
    """Starts a side (with its agent, for the platform) and waits until it is ready."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_side_main, args=(kind, child, tokens, *args), name=f"bench-{kind}", daemon=True
    )
    process.start()
    side = ServerProcess(kind, process, parent)
    try:
        status, address, secret, *observed = _receive(parent, kind)
        if status == "agent":
            side.agent = start_side("agent", tokens, address, secret, *observed)
            status, address, secret, *ready = _receive(parent, kind)
            side.database = ready[0] if ready else ""
        if status != "ready":
            raise RuntimeError(f"the {kind} side failed to start: {address}")
    except BaseException:
        side.stop()
        raise
    side.address, side.secret = address, secret
    return side


def _receive(conn: Connection, kind: str) -> tuple[str, ...]:
    """(status, address, secret, then an observed agent's own arguments, or the
    platform's database)."""
    if not conn.poll(START_TIMEOUT_S):
        raise RuntimeError(f"the {kind} side did not start in {START_TIMEOUT_S:.0f} s")
    return tuple(str(part) for part in conn.recv())
