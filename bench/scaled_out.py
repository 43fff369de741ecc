"""`python -m bench.scaled_out`: what scaling the control plane out costs, in one run.

Every service is its own process, started as the README's "Scaling out" starts
them, on real PostgreSQL and Redis (and RabbitMQ with ``--amqp-url``), with one
node whose runtime generates instantly (bench/deployment.py). The load is
bench/gateway.py's: workers sending streamed chat completions of ``--tokens``
tokens back to back, each on its own keep-alive connection, every response
checked; with several gateways the workers take them in turn.

- *forward*: the shared-state path against the in-process path, at 1 and 16
  streams. ``in-process``: one network server, presence and every other shared
  state in each process's memory (no Redis). ``redis``: the same with Redis for
  every service (node presence, configuration changes, rate limits, cache
  invalidations). ``forwarded``: two network replicas on Redis, cloud calling
  replica A, the node connected to replica B: every job is routed on A and
  forwarded to B over the internal ReplicaService stream, its tokens relayed
  back. Keys have rate limits no run reaches (``--no-rate-limits``: none), so
  each request is counted: in memory, or in Redis where shared. Reported: p50/p99
  request latency, and what ``redis`` and ``forwarded`` add to ``in-process``
  (per round, then across rounds).
- *replicas*: requests/s of one against two gateway+cloud replicas (``redis``
  and ``2-replicas``: one account and one network server each), at 16 and 64
  streams, with CPU per request of the control plane (every gateway, cloud,
  network and account process together) and apart of the PostgreSQL backends
  of its database, the Redis and RabbitMQ servers (whole: other users count)
  and the node.

All deployments run side by side; each round measures every (deployment,
streams) pair once for ``--seconds``, in an order that rotates between
rounds, so that the ratios come from one run and the same machine. Method and
results: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis

from bench.deployment import (
    CONTROL_PLANE,
    Deployment,
    SharedServices,
    Topology,
    deployed,
    rabbitmq_vhost,
)
from bench.gateway import Level, PlatformStream, Stream, run_load
from bench.machine_load import (
    MARKS,
    POSTGRES,
    RABBITMQ,
    REDIS,
    LoadSample,
    MachineLoad,
    cell,
    worse,
)
from core.logging import configure_logging

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
IN_PROCESS = Topology("in-process", shared=False)
REDIS_LOCAL = Topology("redis")
FORWARDED = Topology("forwarded", networks=2, node_on=1, cloud_network=0)
TWO_REPLICAS = Topology("2-replicas", pairs=2)


@dataclass(frozen=True)
class Comparison:
    name: str
    topologies: tuple[Topology, ...]  # the first is the baseline
    levels: tuple[int, ...]


COMPARISONS = {
    "forward": Comparison("forward", (IN_PROCESS, REDIS_LOCAL, FORWARDED), (1, 16)),
    "replicas": Comparison("replicas", (REDIS_LOCAL, TWO_REPLICAS), (16, 64)),
}
WARM_UP_S = 1.0
WARM_UP_STREAMS = 16


@dataclass(frozen=True)
class Measurement:
    topology: str
    streams: int
    round: int
    level: Level
    cpu_s: dict[str, float]  # by role, over the measurement
    load: LoadSample

    def cpu_ms_per_request(self, *roles: str) -> float:
        return sum(self.cpu_s[role] for role in roles) * 1000 / max(self.level.requests, 1)


def _open_streams(deployment: Deployment, tokens: int) -> Callable[[], Stream]:
    """Each new worker takes the next gateway in turn."""
    gateways = itertools.cycle(deployment.gateways)

    def open_stream() -> Stream:
        return PlatformStream(next(gateways), deployment.api_key, tokens)

    return open_stream


async def _measure(
    deployment: Deployment,
    load: MachineLoad,
    streams: int,
    round_: int,
    args: argparse.Namespace,
) -> Measurement:
    name = deployment.topology.name
    await asyncio.to_thread(load.wait_for_quiet)
    before, started = deployment.cpu_s(), load.start()
    level = await run_load(
        _open_streams(deployment, args.tokens), streams, args.seconds, args.max_requests
    )
    sample = load.stop(started, f"{name}@{streams} r{round_ + 1}")
    after = deployment.cpu_s()
    measured = Measurement(
        name, streams, round_, level, {role: after[role] - before[role] for role in after}, sample
    )
    print(
        f"round {round_ + 1} {name:>10} streams={streams:>3}: {level.per_s:6.0f} req/s, "
        f"p50 {level.percentile(50) * 1000:7.2f} ms, p99 {level.percentile(99) * 1000:7.2f} ms, "
        f"{level.errors} errors; control plane "
        f"{measured.cpu_ms_per_request(*CONTROL_PLANE):.2f} ms CPU per request | "
        f"{sample.describe()}",
        flush=True,
    )
    return measured


def _schedule(comparisons: Sequence[Comparison]) -> list[tuple[int, Topology]]:
    """Every (streams, deployment) pair the comparisons need, once."""
    pairs: dict[tuple[int, str], Topology] = {}
    for comparison in comparisons:
        for streams in comparison.levels:
            for topology in comparison.topologies:
                pairs[(streams, topology.name)] = topology
    return [(streams, topology) for (streams, _), topology in sorted(pairs.items())]


async def _run(args: argparse.Namespace, comparisons: Sequence[Comparison]) -> list[Measurement]:
    shared = SharedServices(args.database_url, args.redis_url, args.amqp_url)
    topologies = {t.name: t for c in comparisons for t in c.topologies}
    await _check_services(shared, topologies.values())
    schedule = _schedule(comparisons)
    measurements: list[Measurement] = []
    async with contextlib.AsyncExitStack() as stack:
        began = time.perf_counter()
        deployments: dict[str, Deployment] = {}

        async def start(topology: Topology) -> None:
            deployments[topology.name] = await stack.enter_async_context(
                deployed(topology, shared, args.tokens, rate_limits=not args.no_rate_limits)
            )

        async with asyncio.TaskGroup() as group:
            for topology in topologies.values():
                group.create_task(start(topology))
        print(f"{len(deployments)} deployments serving after {time.perf_counter() - began:.0f} s")
        services = {POSTGRES, REDIS} | ({RABBITMQ} if args.amqp_url else set())
        load = MachineLoad(
            databases={d.database for d in deployments.values()}, services=frozenset(services)
        )
        for deployment in deployments.values():  # unmeasured: caches, connections
            await run_load(
                _open_streams(deployment, args.tokens),
                WARM_UP_STREAMS,
                WARM_UP_S,
                args.max_requests,
            )
        for round_ in range(args.rounds):
            shift = round_ % len(schedule)
            for streams, topology in schedule[shift:] + schedule[:shift]:
                measurements.append(
                    await _measure(deployments[topology.name], load, streams, round_, args)
                )
        print(load.summary())
    return measurements


class ServicesUnreachable(SystemExit):
    """A shared service the deployments need does not answer."""


async def _check_services(shared: SharedServices, topologies: Iterable[Topology]) -> None:
    """Every shared service answers, or the run stops here with what to do."""
    try:
        connection = await asyncpg.connect(shared.database_url, timeout=5)
        await connection.close()
    except (OSError, asyncpg.PostgresError) as error:
        raise ServicesUnreachable(
            f"PostgreSQL at {shared.database_url} is unreachable: {error}"
        ) from None
    client = redis.Redis.from_url(shared.redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        raise ServicesUnreachable(f"Redis at {shared.redis_url} is unreachable: {error}") from None
    finally:
        client.close()
    if not shared.amqp_url:
        return
    import aio_pika

    for topology in topologies:
        if not topology.shared:
            continue
        url = rabbitmq_vhost(shared.amqp_url, topology)
        try:
            broker = await aio_pika.connect(url, timeout=5)
        except Exception as error:  # aio_pika raises several kinds; all mean "not usable"
            vhost = url.rsplit("/", 1)[1]
            raise ServicesUnreachable(
                f"RabbitMQ virtual host {vhost} is not usable at {url} ({error!r}); create it: "
                f"rabbitmqctl add_vhost {vhost} && rabbitmqctl set_permissions -p {vhost} "
                "guest '.*' '.*' '.*'"
            ) from None
        await broker.close()


# --- report ------------------------------------------------------------------------


def _rows(measurements: Sequence[Measurement], topology: str, streams: int) -> list[Measurement]:
    return sorted(
        (m for m in measurements if m.topology == topology and m.streams == streams),
        key=lambda m: m.round,
    )


def _paired(
    measurements: Sequence[Measurement],
    topology: str,
    baseline: str,
    streams: int,
    value: Callable[[Measurement, Measurement], float],
) -> str:
    """``value`` of each round's pair (that topology's and the baseline's measurement)."""
    pairs = list(
        zip(
            _rows(measurements, topology, streams),
            _rows(measurements, baseline, streams),
            strict=True,
        )
    )
    return cell(
        [value(a, b) for a, b in pairs], [worse(a.load, b.load) for a, b in pairs], "{:.2f}"
    )


def _ms(number: float) -> float:
    return number * 1000


def _added(percentile: int) -> Callable[[Measurement, Measurement], float]:
    """Milliseconds a measurement's ``percentile`` is above its baseline's."""

    def added(measured: Measurement, baseline: Measurement) -> float:
        return _ms(measured.level.percentile(percentile) - baseline.level.percentile(percentile))

    return added


def render_forward(measurements: Sequence[Measurement], comparison: Comparison) -> str:
    baseline = comparison.topologies[0].name
    lines = [
        "\n### forward: added latency of the shared-state path (median [min..max] sd over "
        "rounds; ms)\n",
        "| streams | path | req/s | p50 | p99 | added p50 | added p99 "
        "| control-plane CPU/request | PostgreSQL CPU/request |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for streams in comparison.levels:
        for topology in comparison.topologies:
            rows = _rows(measurements, topology.name, streams)
            loads = [m.load for m in rows]
            added = [
                "—"
                if topology.name == baseline
                else _paired(measurements, topology.name, baseline, streams, _added(p))
                for p in (50, 99)
            ]
            lines.append(
                f"| {streams} | {topology.name} "
                f"| {cell([m.level.per_s for m in rows], loads, '{:.0f}')} "
                f"| {cell([_ms(m.level.percentile(50)) for m in rows], loads, '{:.2f}')} "
                f"| {cell([_ms(m.level.percentile(99)) for m in rows], loads, '{:.2f}')} "
                f"| {added[0]} | {added[1]} "
                f"| {cell([m.cpu_ms_per_request(*CONTROL_PLANE) for m in rows], loads, '{:.2f}')} "
                f"| {cell([m.cpu_ms_per_request('postgres') for m in rows], loads, '{:.2f}')} |"
            )
    return "\n".join(lines)


def render_replicas(measurements: Sequence[Measurement], comparison: Comparison) -> str:
    baseline = comparison.topologies[0].name
    roles = ("postgres", "redis", "rabbitmq", "agent")
    lines = [
        "\n### replicas: one against two gateway+cloud replicas (median [min..max] sd over "
        "rounds; CPU in ms per request)\n",
        "| streams | deployment | req/s | ratio to one | p50 ms | p99 ms | control plane "
        "| gateway / cloud / network / account | PostgreSQL backends | Redis server "
        "| RabbitMQ server | node |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for streams in comparison.levels:
        for topology in comparison.topologies:
            rows = _rows(measurements, topology.name, streams)
            loads = [m.load for m in rows]
            ratio = (
                "1"
                if topology.name == baseline
                else _paired(
                    measurements,
                    topology.name,
                    baseline,
                    streams,
                    lambda a, b: a.level.per_s / b.level.per_s,
                )
            )
            split = " / ".join(
                f"{sorted(m.cpu_ms_per_request(role) for m in rows)[len(rows) // 2]:.2f}"
                for role in CONTROL_PLANE
            )
            others = " | ".join(
                cell([m.cpu_ms_per_request(role) for m in rows], loads, "{:.2f}")
                if any(m.cpu_s[role] for m in rows)
                else "—"  # not used (RabbitMQ without --amqp-url), or not on this machine
                for role in roles
            )
            lines.append(
                f"| {streams} | {topology.name} "
                f"| {cell([m.level.per_s for m in rows], loads, '{:.0f}')} | {ratio} "
                f"| {cell([_ms(m.level.percentile(50)) for m in rows], loads, '{:.1f}')} "
                f"| {cell([_ms(m.level.percentile(99)) for m in rows], loads, '{:.1f}')} "
                f"| {cell([m.cpu_ms_per_request(*CONTROL_PLANE) for m in rows], loads, '{:.2f}')} "
                f"| {split} (medians) | {others} |"
            )
    return "\n".join(lines)


RENDER = {"forward": render_forward, "replicas": render_replicas}


def _json(measurements: Sequence[Measurement], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "scaled_out",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arguments": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "measurements": [
            {
                "topology": m.topology,
                "streams": m.streams,
                "round": m.round + 1,
                "requests": m.level.requests,
                "errors": m.level.errors,
                "requests_per_s": m.level.per_s,
                "p50_ms": _ms(m.level.percentile(50)),
                "p99_ms": _ms(m.level.percentile(99)),
                "cpu_s": m.cpu_s,
                "load": m.load.as_json(),
            }
            for m in measurements
        ],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaled_out", description=__doc__)
    parser.add_argument(
        "--compare", choices=(*COMPARISONS, "both"), default="both", help="default: both"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per completion")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per measurement")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("RESULTITY_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the PostgreSQL server (default: $RESULTITY_DATABASE_URL or loopback)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("RESULTITY_REDIS_URL", DEFAULT_REDIS_URL),
        help="the Redis server (default: $RESULTITY_REDIS_URL or loopback)",
    )
    parser.add_argument(
        "--amqp-url",
        help="a RabbitMQ broker, for account and cloud; each deployment uses the virtual host "
        "resultity-bench-<deployment>, which must exist (default: no RabbitMQ)",
    )
    parser.add_argument(
        "--no-rate-limits",
        action="store_true",
        help="keys unlimited (default: per-key limits no run reaches, so that every request "
        "is counted, in Redis where shared)",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        raise SystemExit("--rounds and --seconds must be positive")
    configure_logging("warning")
    chosen = list(COMPARISONS.values()) if args.compare == "both" else [COMPARISONS[args.compare]]
    print(
        f"scaled-out control plane: {args.tokens}-token streamed completions, {args.rounds} "
        f"rounds of {args.seconds:g} s per measurement; PostgreSQL {args.database_url}, "
        f"Redis {args.redis_url}, RabbitMQ {args.amqp_url or 'none'}",
        flush=True,
    )
    measurements = asyncio.run(_run(args, chosen))
    for comparison in chosen:
        print(RENDER[comparison.name](measurements, comparison))
    print(MARKS)
    print(f"requests that failed: {sum(m.level.errors for m in measurements)}")
    if args.json:
        args.json.write_text(json.dumps(_json(measurements, args), indent=2) + "\n")
        print(f"JSON written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
