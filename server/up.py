"""`resultity up`: the whole platform on one machine.

Embedded PostgreSQL (unless a database URL is given), the network, account and
cloud services on one gRPC server, one local agent process serving the bundled
model, and the OpenAI gateway. The services still call each other over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from core import channels
from core.grpc_metrics import GrpcServerMetrics
from core.namespace import RedisNames
from core.prometheus import PrometheusMetrics
from gateway.app import create_app
from gateway.console import ConsoleTargets, console_sessions
from gateway.server import serve as serve_gateway
from server.account.component import SERVICE_NAMES as ACCOUNT_SERVICES
from server.account.component import AccountComponent
from server.addresses import PlatformAddresses, remove_addresses, write_addresses
from server.bootstrap import DEMO_KEY_FILE, ensure_demo_key, ensure_node_token
from server.cloud.component import SERVICE_NAMES as CLOUD_SERVICES
from server.cloud.component import CloudComponent
from server.cloud.settings import LOCAL_RATE_LIMITS, RateLimitSettings
from server.common.database import EmbeddedPostgres
from server.common.health import GrpcHealth
from server.common.settlement_queue import InProcessSettlementQueue
from server.common.shared_state import SharedState
from server.network.component import SERVICE_NAMES as NETWORK_SERVICES
from server.network.component import NetworkComponent
from server.network.service import LivenessSettings
from server.secrets import load_or_create_secrets
from server.settings import PlatformSettings
from server.supervisor import SupervisedProcess

log = structlog.get_logger(__name__)

AGENT_READY_TIMEOUT_S = 300.0


@asynccontextmanager
async def _database(settings: PlatformSettings) -> AsyncIterator[str]:
    if settings.database_url:
        yield settings.database_url
        return
    embedded = EmbeddedPostgres(settings.data_dir.resolve() / "postgres")
    dsn = await embedded.start("resultity")
    try:
        yield dsn
    finally:
        await embedded.stop()


@asynccontextmanager
async def _local_agent(
    settings: PlatformSettings, network: NetworkComponent, node_token: str
) -> AsyncIterator[None]:
    """A child agent process, restarted with backoff if it exits (server/supervisor.py)
    and stopped with SIGTERM (then SIGKILL) on exit. Its key lives in
    <data dir>/agent, so a restarted agent is the same node; its node token comes
    through the environment."""
    argv = (
        sys.executable,
        "-m",
        "server.cli",
        "--log-level",
        settings.log_level,
        *(("--log-json",) if settings.log_json else ()),
        "agent",
        "--network",
        f"127.0.0.1:{settings.grpc_port}",
        "--name",
        "local",
        "--slots",
        str(settings.local_agent_slots),
        "--threads",
        str(settings.local_agent_threads or os.cpu_count() or 1),
        "--data-dir",
        str(settings.data_dir.resolve() / "agent"),
        *(("--region", settings.local_agent_region) if settings.local_agent_region else ()),
        *(
            ("--metrics-port", str(settings.local_agent_metrics_port))
            if settings.local_agent_metrics_port is not None
            else ()
        ),
    )
    agent = SupervisedProcess(
        "local agent", argv, {**os.environ, "RESULTITY_NODE_TOKEN": node_token}
    )
    await agent.start()
    try:
        await _wait_for_node(network, agent)
        yield
    finally:
        await agent.stop()


async def _wait_for_node(network: NetworkComponent, agent: SupervisedProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AGENT_READY_TIMEOUT_S
    # Registered and through join validation (a node failing it is quarantined;
    # the platform still starts and the operator sees why in `resultity nodes`).
    while not any(not node.validating for node in network.service.nodes()):
        # Exiting during start-up is a configuration problem, not one to retry.
        process = agent.process
        if agent.restarts or (process is not None and process.returncode is not None):
            code = process.returncode if process is not None else None
            raise RuntimeError(f"the local agent exited during start-up (code {code})")
        if loop.time() > deadline:
            raise RuntimeError("the local agent did not register and validate in time")
        await asyncio.sleep(0.2)


async def run_platform(settings: PlatformSettings, *, ready: asyncio.Event | None = None) -> None:
    """Runs until cancelled, SIGINT or SIGTERM; shuts down in reverse order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    tls = channels.Tls(
        cert=settings.tls_cert, key=settings.tls_key, client_ca=settings.tls_client_ca
    )
    # One registry for the whole process, served at the gateway's /metrics.
    metrics = PrometheusMetrics()
    server = channels.server([GrpcServerMetrics(metrics)])
    channels.listen(server, address, tls)
    # With TLS on the public listener, the platform's own calls (and its local agent)
    # use a plaintext listener of their own on loopback.
    grpc_target = (
        f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        if tls.serves
        else f"127.0.0.1:{settings.grpc_port}"
    )

    async with AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(_database(settings))
        secrets = load_or_create_secrets(
            data_dir,
            key_hash_secret=_secret(settings.key_hash_secret),
            service_token=_secret(settings.service_token),
        )
        redis_names = RedisNames(settings.namespace)
        shared = await SharedState.open(settings.redis_url, redis_names)
        stack.push_async_callback(shared.close)
        # Without RabbitMQ, one in-process settlement queue: cloud defers to it, the
        # account component applies from it and sees what waits before releasing holds.
        settlements = None if settings.amqp_url else InProcessSettlementQueue()
        account = await AccountComponent.start(
            dsn,
            secrets,
            changes=shared.invalidations,
            amqp_url=settings.amqp_url,
            namespace=settings.namespace,
            settlements=settlements,
            metrics=metrics,
        )
        stack.push_async_callback(account.stop)
        network = NetworkComponent(
            liveness=LivenessSettings(settings.heartbeat_interval_s, settings.heartbeat_timeout_s),
            account_target=grpc_target,
            service_token=secrets.service_token,
            database_url=dsn,
            metrics=metrics,
        )
        await network.start()
        rate_limits = RateLimitSettings()
        if settings.default_rate_limits:
            rate_limits = rate_limits.over(LOCAL_RATE_LIMITS)
        cloud = await CloudComponent.start(
            dsn,
            account_target=grpc_target,
            network_target=grpc_target,
            service_token=secrets.service_token,
            rate_limits=rate_limits,
            shared=shared,
            amqp_url=settings.amqp_url,
            namespace=settings.namespace,
            settlements=settlements,
            metrics=metrics,
        )
        stack.push_async_callback(cloud.stop)

        for component in (account, network, cloud):
            component.register(server)
        health = GrpcHealth(server, (*ACCOUNT_SERVICES, *NETWORK_SERVICES, *CLOUD_SERVICES))
        await health.starting()
        await server.start()
        stack.push_async_callback(server.stop, 5.0)
        # Unwinds before the server stops (the gateway has stopped by then): the server's
        # grace would otherwise wait for cloud's open job streams to the network.
        stack.push_async_callback(cloud.close_job_streams)
        await health.serving()
        readiness = asyncio.create_task(cloud.follow_readiness(health), name="cloud-readiness")
        stack.push_async_callback(_cancel, readiness)
        # Unwinds before the server stops, so connected agents are told to reconnect.
        stack.push_async_callback(network.stop)
        # Unwinds before that: probes see NOT_SERVING while the rest shuts down.
        stack.push_async_callback(health.draining)
        log.info("grpc services listening", address=address, tls=tls.serves)

        bootstrap_channel = channels.insecure_channel(grpc_target)
        try:
            api_key = await ensure_demo_key(
                bootstrap_channel, data_dir, settings.demo_credits, secrets.service_token
            )
            node_token = await ensure_node_token(bootstrap_channel, data_dir, secrets.service_token)
        finally:
            await bootstrap_channel.close(grace=None)

        if settings.local_agent:
            await stack.enter_async_context(_local_agent(settings, network, node_token))

        gateway_started = asyncio.Event()
        gateway = asyncio.create_task(
            serve_gateway(
                create_app(
                    grpc_target,
                    console=ConsoleTargets(grpc_target, grpc_target, grpc_target),
                    metrics=metrics,
                    console_sessions=console_sessions(settings.redis_url, redis_names),
                ),
                settings.http_host,
                settings.http_port,
                started=gateway_started,
            ),
            name="gateway",
        )
        stack.push_async_callback(_cancel, gateway)
        await _first(gateway_started.wait(), gateway)
        write_addresses(data_dir, _addresses(settings, grpc_target))
        stack.callback(remove_addresses, data_dir)
        _print_banner(settings, api_key, data_dir / DEMO_KEY_FILE)
        if ready is not None:
            ready.set()
        await _first(stop.wait(), gateway)
        log.info("shutting down")


def _addresses(settings: PlatformSettings, grpc_target: str) -> PlatformAddresses:
    agent_port = settings.local_agent_metrics_port
    return PlatformAddresses(
        grpc=grpc_target,
        http=f"http://{settings.http_host}:{settings.http_port}",
        agent_metrics=(
            f"http://127.0.0.1:{agent_port}/metrics"
            if settings.local_agent and agent_port is not None
            else ""
        ),
    )


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


async def _first(awaitable: Coroutine[Any, Any, Any], guard: asyncio.Task[None]) -> None:
    """Awaits ``awaitable`` but fails if ``guard`` ends first (e.g. port in use)."""
    waiter = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({waiter, guard}, return_when=asyncio.FIRST_COMPLETED)
    if guard in done and waiter not in done:
        waiter.cancel()
        guard.result()
        raise RuntimeError("the gateway stopped unexpectedly")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _print_banner(settings: PlatformSettings, api_key: str, key_file: Path) -> None:
    base = f"http://{settings.http_host}:{settings.http_port}/v1"
    console = f"http://{settings.http_host}:{settings.http_port}/console"
    print(
        f"""
Resultity is running.
  OpenAI-compatible API: {base}
  Web console:           {console}   (sign in with the demo key)
  Prometheus metrics:    http://{settings.http_host}:{settings.http_port}/metrics
  gRPC services:         {settings.grpc_host}:{settings.grpc_port}
  Demo API key:          {api_key}   (saved in {key_file})

  curl {base}/chat/completions -H "Authorization: Bearer $(cat {key_file})" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "smollm2-135m-instruct", "messages": [{{"role": "user", "content": "Hi"}}]}}'

Press Ctrl-C to stop.
""",
        flush=True,
    )
