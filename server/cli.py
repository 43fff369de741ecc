"""The `resultity` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from core import channels, event_loop, tracing
from core.logging import configure_logging
from core.namespace import DEFAULT_NAMESPACE, RedisNames, validate_namespace

if TYPE_CHECKING:
    from fastapi import FastAPI

    from core.prometheus import PrometheusMetrics
    from server.common.health import GrpcHealth
    from server.network.fleet import ReplicaSettings
    from server.network.presence import Presence

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resultity", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("RESULTITY_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("RESULTITY_LOG_JSON", "").lower() in ("1", "true", "yes"),
        help="log as JSON lines (default: $RESULTITY_LOG_JSON)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole platform on this machine")
    up.add_argument("--data-dir", type=Path)
    up.add_argument("--http-host")
    up.add_argument("--http-port", type=int)
    up.add_argument("--grpc-host", help="0.0.0.0 lets agents on other machines connect")
    up.add_argument("--grpc-port", type=int)
    up.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one")
    up.add_argument(
        "--redis-url",
        help="share rate limits, invalidations and console sessions with other replicas here",
    )
    _namespace_option(up)
    up.add_argument("--no-agent", action="store_true", help="do not start a local agent")
    up.add_argument(
        "--no-rate-limits",
        action="store_true",
        help="no default rate limits: only those RESULTITY_RATE_LIMIT_* variables set",
    )
    up.add_argument(
        "--agent-slots",
        type=_slots,
        help="generations the local agent runs at once, batched on one copy of the model "
        "(default 4)",
    )
    up.add_argument("--agent-threads", type=int, help="llama.cpp threads of the local agent")
    up.add_argument(
        "--agent-region", type=_region, help="region the local agent declares, e.g. eu-west"
    )
    up.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS")
    up.add_argument("--tls-key", type=Path)
    up.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA"
    )
    up.add_argument(
        "--agent-metrics-port",
        type=int,
        help="serve the local agent's Prometheus metrics on this port (the platform's "
        "are at the HTTP API's /metrics)",
    )
    # Also accepted after `up`, for `make run ARGS=--log-json`.
    up.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS)

    agent = commands.add_parser("agent", help="run a node agent")
    agent.add_argument(
        "--network",
        required=True,
        help="HOST:PORT of a network server, or of several replicas comma-separated "
        "(or a DNS name resolving to several): the agent re-homes to another when its "
        "replica goes away",
    )
    agent.add_argument("--name", default=socket.gethostname(), help="node name shown to operators")
    agent.add_argument("--runtime", default="llama.cpp")
    agent.add_argument("--model-id")
    agent.add_argument("--model-path", type=Path, help="GGUF file (default: bundled SmolLM2)")
    agent.add_argument("--context-length", type=int, default=2048)
    agent.add_argument(
        "--slots",
        type=_slots,
        default=1,
        help="jobs run at the same time, batched on one copy of the model",
    )
    agent.add_argument("--threads", type=int, help="CPU threads per generation")
    agent.add_argument(
        "--region",
        type=_region,
        default="",
        help="where the node runs, e.g. eu-west (lowercase a-z, 0-9, '-'; at most 32); "
        "requests may ask for regions",
    )
    agent.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity-agent"),
        help="where the node's key is kept (created on first start)",
    )
    agent.add_argument(
        "--node-token",
        default=os.environ.get("RESULTITY_NODE_TOKEN", ""),
        help="the operator's node token (default: $RESULTITY_NODE_TOKEN)",
    )
    agent.add_argument(
        "--drain-grace",
        type=float,
        default=30.0,
        help="seconds running jobs may take to finish after SIGTERM",
    )
    _tls_arguments(agent, serves=False)
    _metrics_arguments(agent)

    network = commands.add_parser("network", help="run the network server alone")
    network.add_argument("--listen", default="127.0.0.1:50051")
    network.add_argument(
        "--account",
        help="HOST:PORT of the account server that resolves node tokens, or of its "
        "replicas comma-separated (without it, tokens are not checked and nodes earn "
        "nothing)",
    )
    network.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity"),
        help="where the service token (required of dispatch and node admin callers) is "
        "read from, or created if missing, unless RESULTITY_SERVICE_TOKEN is set",
    )
    network.add_argument(
        "--database-url",
        default=os.environ.get("RESULTITY_DATABASE_URL"),
        help="PostgreSQL for node standings, configuration versions and job records "
        "(replicas of one network share it; may be the account server's database)",
    )
    network.add_argument(
        "--redis-url",
        default=os.environ.get("RESULTITY_REDIS_URL"),
        help="Redis the replicas share node presence and configuration changes through "
        "(without it, this server is the only replica)",
    )
    _namespace_option(network)
    network.add_argument(
        "--replica-id",
        help="this replica's name among the network's replicas (default: random)",
    )
    network.add_argument(
        "--advertise",
        help="HOST:PORT other replicas forward jobs to (default: --listen, with this "
        "machine's hostname if it listens on all interfaces)",
    )
    _tls_arguments(network, serves=True)
    _metrics_arguments(network)

    account = commands.add_parser("account", help="run the account server alone")
    account.add_argument("--listen", default="127.0.0.1:50052")
    account.add_argument("--database-url", default=os.environ.get("RESULTITY_DATABASE_URL"))
    _redis_option(account, "where revoked keys and changed accounts are announced to cloud")
    _amqp_option(account, "applies deferred settlements from it and relays ledger events")
    _namespace_option(account)
    account.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity"),
        help="where the key hashing secret and service token live (created if missing)",
    )
    _tls_arguments(account, serves=True)
    _metrics_arguments(account)
    from server.account.admin_cli import add_commands

    add_commands(account)

    cloud = commands.add_parser("cloud", help="run the cloud server alone")
    cloud.add_argument("--listen", default="127.0.0.1:50053")
    cloud.add_argument(
        "--account",
        required=True,
        help="HOST:PORT of the account server, or of its replicas comma-separated: calls "
        "are spread over them and go on to the next when one is unreachable",
    )
    cloud.add_argument(
        "--network",
        required=True,
        help="HOST:PORT of the network server, or of its replicas comma-separated "
        "(spread and failed over alike)",
    )
    cloud.add_argument(
        "--database-url",
        default=os.environ.get("RESULTITY_DATABASE_URL"),
        help="PostgreSQL for subclouds (may be the account server's database)",
    )
    _redis_option(cloud, "rate-limit counters and cache invalidations shared by cloud replicas")
    _amqp_option(cloud, "settlements the account server does not answer wait in it")
    _namespace_option(cloud)
    cloud.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".resultity"),
        help="where the service token is read from unless RESULTITY_SERVICE_TOKEN is set",
    )
    _tls_arguments(cloud, serves=True)
    _metrics_arguments(cloud)

    from server.network.cli import add_commands as add_node_commands

    add_node_commands(commands)

    from server.cloud.cli import add_commands as add_subcloud_commands

    add_subcloud_commands(commands)

    from server.cloud.jobs_cli import add_commands as add_job_commands

    add_job_commands(commands)

    gateway = commands.add_parser("gateway", help="run the OpenAI HTTP gateway alone")
    gateway.add_argument(
        "--cloud",
        required=True,
        help="HOST:PORT of the cloud server, or of its replicas comma-separated "
        "(spread and failed over alike; /ready while any one serves)",
    )
    gateway.add_argument(
        "--account", help="HOST:PORT of the account server: with --network, serves /console"
    )
    gateway.add_argument("--network", help="HOST:PORT of the network server (for /console)")
    _redis_option(gateway, "console sessions shared by gateway replicas (no sticky sessions)")
    _namespace_option(gateway)
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8080)
    _tls_arguments(gateway, serves=False)
    return parser


def _redis_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("RESULTITY_REDIS_URL"),
        help=f"Redis for {what} (default: $RESULTITY_REDIS_URL; unset: this process alone)",
    )


def _amqp_option(parser: argparse.ArgumentParser, use: str) -> None:
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("RESULTITY_AMQP_URL"),
        help=f"RabbitMQ: {use} (unset: a queue in this process)",
    )


def _namespace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        type=_namespace,
        default=os.environ.get("RESULTITY_NAMESPACE", DEFAULT_NAMESPACE),
        help="the deployment's name in Redis and RabbitMQ, prefixing every key, channel, "
        "exchange and queue: deployments sharing them need their own (default: "
        f"$RESULTITY_NAMESPACE, else {DEFAULT_NAMESPACE!r})",
    )


def _tls_arguments(parser: argparse.ArgumentParser, *, serves: bool) -> None:
    """TLS flags; each defaults to its RESULTITY_TLS_* environment variable."""
    env = os.environ.get
    if serves:
        parser.add_argument(
            "--tls-cert",
            type=Path,
            default=env("RESULTITY_TLS_CERT"),
            help="PEM certificate chain: serve TLS (and present it to servers that ask)",
        )
        parser.add_argument("--tls-key", type=Path, default=env("RESULTITY_TLS_KEY"))
        parser.add_argument(
            "--tls-client-ca",
            type=Path,
            default=env("RESULTITY_TLS_CLIENT_CA"),
            help="require client certificates signed by this CA (mutual TLS)",
        )
    parser.add_argument(
        "--tls",
        action="store_true",
        default=env("RESULTITY_TLS", "") == "1",
        help="connect to other services over TLS, verified with the system's CAs",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=env("RESULTITY_TLS_CA"),
        help="connect over TLS, verifying servers with this CA file instead",
    )


def _metrics_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    port = env("RESULTITY_METRICS_PORT", "")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(port) if port.isdigit() else None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "(default: $RESULTITY_METRICS_PORT; unset: not collected)",
    )
    parser.add_argument(
        "--metrics-host",
        default=env("RESULTITY_METRICS_HOST", "127.0.0.1"),
        help="interface the metrics are served on (default: $RESULTITY_METRICS_HOST, "
        "else loopback; 0.0.0.0 for a Prometheus on another machine)",
    )


def _served_metrics(args: argparse.Namespace) -> PrometheusMetrics | None:
    """This process's metrics, served on --metrics-port; None without one."""
    if args.metrics_port is None:
        return None
    from core.prometheus import PrometheusMetrics

    metrics = PrometheusMetrics()
    port = metrics.serve(args.metrics_port, args.metrics_host)
    log.info("metrics served", url=f"http://{args.metrics_host}:{port}/metrics")
    return metrics


def _tls(args: argparse.Namespace) -> channels.Tls:
    try:
        return channels.Tls(
            cert=getattr(args, "tls_cert", None),
            key=getattr(args, "tls_key", None),
            connect=args.tls or args.tls_ca is not None,
            ca=args.tls_ca,
            client_ca=getattr(args, "tls_client_ca", None),
        )
    except ValueError as error:
        raise SystemExit(f"{args.command}: {error}") from None


def _slots(value: str) -> int:
    try:
        slots = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if slots < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return slots


def _namespace(value: str) -> str:
    from core.errors import InvalidArgument

    try:
        return validate_namespace(value)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(error.message) from None


def _region(value: str) -> str:
    from core.errors import InvalidArgument
    from core.regions import validate_region

    try:
        return validate_region(value) if value else value  # empty: undeclared
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(error.message) from None


# What each long-running command is called in traces (resultity-<name>).
_TRACED = {"up": "platform", "agent": "agent", "network": "network", "cloud": "cloud"}


def _traced_as(args: argparse.Namespace) -> str | None:
    """The service name a command's process traces as; None for one-shot commands."""
    if args.command == "account":
        return None if args.account_command else "account"
    if args.command == "gateway":
        return "gateway"
    return _TRACED.get(args.command)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    service = _traced_as(args)
    if service is not None and tracing.configure_tracing(service):
        log.info("tracing", service=f"resultity-{service}", exporter="otlp")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            event_loop.run(_run(args))
    except grpc.aio.AioRpcError as error:
        # A refused or failed call is the answer, not a crash: one line, exit 1.
        from core.grpc_errors import describe_rpc_error

        raise SystemExit(f"error: {describe_rpc_error(error)}") from None
    finally:
        tracing.shutdown_tracing()


async def _run(args: argparse.Namespace) -> None:
    if args.command == "up":
        await _up(args)
    elif args.command == "agent":
        await _agent(args)
    elif args.command == "gateway":
        from gateway.server import serve

        await _until_signal(serve(_gateway_app(args), args.host, args.port))
    elif args.command == "subclouds":
        from server.cloud.cli import run_command as run_subclouds_command

        await run_subclouds_command(args)
    elif args.command == "jobs":
        from server.cloud.jobs_cli import run_command as run_jobs_command

        await run_jobs_command(args)
    elif args.command == "nodes":
        from server.network.cli import run_command as run_nodes_command

        await run_nodes_command(args)
    elif args.command == "account" and args.account_command:
        from server.account.admin_cli import run_command

        await run_command(args)
    else:
        await _serve_one(args)


def _gateway_app(args: argparse.Namespace) -> FastAPI:
    from gateway.app import create_app
    from gateway.console import ConsoleTargets, console_sessions

    if (args.account is None) != (args.network is None):
        raise SystemExit("gateway: the console needs both --account and --network")
    console = (
        None if args.account is None else ConsoleTargets(args.account, args.network, args.cloud)
    )
    # The gateway's metrics are always collected: its /metrics serves them.
    from core.prometheus import PrometheusMetrics

    return create_app(
        args.cloud,
        tls=_tls(args),
        console=console,
        metrics=PrometheusMetrics(),
        console_sessions=console_sessions(args.redis_url, RedisNames(args.namespace)),
    )


async def _up(args: argparse.Namespace) -> None:
    from server.settings import PlatformSettings
    from server.up import run_platform

    overrides = {
        "data_dir": args.data_dir,
        "http_host": args.http_host,
        "http_port": args.http_port,
        "grpc_host": args.grpc_host,
        "grpc_port": args.grpc_port,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "database_url": args.database_url,
        "redis_url": args.redis_url,
        "namespace": args.namespace,
        "log_level": args.log_level,
        "local_agent_slots": args.agent_slots,
        "local_agent_threads": args.agent_threads,
        "local_agent_region": args.agent_region,
        "local_agent_metrics_port": args.agent_metrics_port,
        "log_json": args.log_json or None,
    }
    settings = PlatformSettings(**{k: v for k, v in overrides.items() if v is not None})
    if args.no_agent:
        settings = settings.model_copy(update={"local_agent": False})
    if args.no_rate_limits:
        settings = settings.model_copy(update={"default_rate_limits": False})
    await run_platform(settings)


async def _agent(args: argparse.Namespace) -> None:
    from agent.identity import NodeIdentity
    from agent.main import run_agent
    from agent.runtime.loader import RuntimeSettings
    from agent.session import SessionSettings
    from agent.telemetry import AgentMetrics

    runtime = RuntimeSettings(
        runtime=args.runtime,
        model_path=args.model_path,
        context_length=args.context_length,
        slots=args.slots,
        threads=args.threads,
    )
    if args.model_id:
        runtime = RuntimeSettings(**{**runtime.__dict__, "model_id": args.model_id})
    await run_agent(
        SessionSettings(
            network=args.network,
            node_name=args.name,
            drain_grace_s=args.drain_grace,
            node_token=args.node_token,
            identity=NodeIdentity.load_or_create(args.data_dir),
            region=args.region,
            tls=_tls(args),
        ),
        runtime,
        metrics=None if (served := _served_metrics(args)) is None else AgentMetrics(served),
    )


async def _serve_one(args: argparse.Namespace) -> None:
    """One service on its own gRPC server, until SIGINT or SIGTERM."""
    from core.grpc_metrics import GrpcServerMetrics
    from core.metrics import NO_METRICS
    from server.common.health import GrpcHealth

    served = _served_metrics(args)
    metrics = served or NO_METRICS
    server = channels.server([GrpcServerMetrics(served)] if served is not None else [])
    tls = _tls(args)
    # A network server tells its agents to reconnect before it stops serving;
    # the others finish their in-flight calls first.
    stop_first: Callable[[], Awaitable[None]] | None = None
    stop_component: Callable[[], Awaitable[None]]
    readiness: Callable[[GrpcHealth], Coroutine[Any, Any, None]] | None = None
    # What this service shares with its replicas (Redis), closed last.
    close_shared: Callable[[], Awaitable[None]] | None = None
    if args.command == "network":
        from server.common.bus_connect import connect_bus
        from server.network.component import SERVICE_NAMES, NetworkComponent
        from server.secrets import service_token

        if not args.database_url:
            raise SystemExit("network: --database-url or RESULTITY_DATABASE_URL is required")
        if args.account is None:
            log.warning("no --account: node tokens are not checked and nodes earn nothing")
        names = RedisNames(args.namespace)
        bus = connect_bus(args.redis_url)
        replica, presence = _replica(args, names)
        network = NetworkComponent(
            account_target=args.account,
            service_token=service_token(args.data_dir, create=True),
            database_url=args.database_url,
            bus=bus,
            names=names,
            tls=tls,
            replica=replica,
            presence=presence,
            metrics=metrics,
        )
        await network.start()
        network.register(server)

        async def stop_network() -> None:
            await network.stop()
            await bus.close()
            if presence is not None:
                await presence.close()

        stop_first = stop_component = stop_network
    elif args.command == "account":
        from server.account.component import SERVICE_NAMES, AccountComponent

        if not args.database_url:
            raise SystemExit("account: --database-url or RESULTITY_DATABASE_URL is required")
        from server.secrets import load_or_create_secrets

        secrets = load_or_create_secrets(
            args.data_dir,
            key_hash_secret=os.environ.get("RESULTITY_KEY_HASH_SECRET"),
            service_token=os.environ.get("RESULTITY_SERVICE_TOKEN"),
        )
        from server.common.shared_state import SharedState

        shared = await SharedState.open(args.redis_url, RedisNames(args.namespace))
        close_shared = shared.close
        account = await AccountComponent.start(
            args.database_url,
            secrets,
            changes=shared.invalidations,
            amqp_url=args.amqp_url,
            namespace=args.namespace,
            metrics=metrics,
        )
        account.register(server)
        stop_component = account.stop
    else:
        from server.cloud.component import SERVICE_NAMES, CloudComponent
        from server.secrets import service_token

        if not args.database_url:
            raise SystemExit("cloud: --database-url or RESULTITY_DATABASE_URL is required")
        from server.common.shared_state import SharedState

        shared = await SharedState.open(args.redis_url, RedisNames(args.namespace))
        close_shared = shared.close
        cloud = await CloudComponent.start(
            args.database_url,
            account_target=args.account,
            network_target=args.network,
            service_token=service_token(args.data_dir),
            shared=shared,
            amqp_url=args.amqp_url,
            namespace=args.namespace,
            tls=tls,
            metrics=metrics,
        )
        cloud.register(server)
        stop_component = cloud.stop
        readiness = cloud.follow_readiness
    health = GrpcHealth(server, SERVICE_NAMES)
    await health.starting()
    channels.listen(server, args.listen, tls)
    await server.start()
    await health.serving()
    log.info("serving", service=args.command, address=args.listen, tls=tls.serves)
    follow = asyncio.create_task(readiness(health)) if readiness is not None else None
    try:
        # Waits for the signal alone: cancelling server.wait_for_termination() would
        # cancel the server's own shutdown, which stop() below still needs.
        await _until_signal(asyncio.Event().wait())
    finally:
        if follow is not None:
            follow.cancel()
        await health.draining()
        if stop_first is not None:
            await stop_first()
        await server.stop(5.0)
        if stop_component is not stop_first:
            await stop_component()
        if close_shared is not None:
            await close_shared()


def _replica(
    args: argparse.Namespace, names: RedisNames
) -> tuple[ReplicaSettings, Presence | None]:
    """This network server's replica settings, and the presence it shares with the
    other replicas: Redis at --redis-url (under ``names``), or none (the only replica)."""
    import uuid

    from server.network.fleet import ReplicaSettings

    host, _, port = args.listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.gethostname()
    replica = ReplicaSettings(
        replica_id=args.replica_id or uuid.uuid4().hex[:12],
        address=args.advertise or f"{host}:{port}",
    )
    if not args.redis_url:
        log.info("no Redis: this network server is the only replica")
        return replica, None
    from server.network.presence_redis import RedisPresence

    log.info("network replica", replica_id=replica.replica_id, advertise=replica.address)
    return replica, RedisPresence.from_url(args.redis_url, names)


async def _until_signal(work: Coroutine[Any, Any, Any]) -> None:
    """Runs ``work`` until it ends or SIGINT/SIGTERM arrives, then cancels it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, waiter):
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await pending


if __name__ == "__main__":
    main()
