"""`python -m bench.gateway`: the platform's own overhead per streamed request.

Streamed chat completions of ``--tokens`` tokens through the real HTTP
gateway (uvicorn) → cloud → network → one agent (AgentSession over gRPC, default
token batching) whose runtime generates instantly (bench/paced_runtime.py, no pace),
with the account layer holding and settling every request in PostgreSQL;
against a floor measured in the same run: a bare ``grpc.aio`` server-streaming
call that streams the same number of messages. Both at 1, 16, 64 and 256
concurrent streams; each level runs for ``--seconds`` (or ``--max-requests``),
``--rounds`` times, alternating floor and platform; each run records the
machine's load (bench/machine_load.py) and the table gives every column across
rounds.

Each server side runs in its own child process (bench/gateway_sides.py), and so
does the platform's agent, as with `resultity up`; the load generator runs in
this one, so client work is not charged to the server's event loop. The
database is the one RESULTITY_DATABASE_URL names (a scratch database is created
on that server and dropped afterwards), or an embedded PostgreSQL. Method and
results: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from bench.gateway_sides import FLOOR_METHOD, OBSERVED, ServerProcess, start_side
from bench.http_client import HttpConnection
from bench.machine_load import MARKS, POSTGRES, LoadSample, MachineLoad, cell, worse
from bench.otlp_sink import OtlpSink
from bench.paced_runtime import MODEL_ID
from core.logging import configure_logging

LEVELS = (1, 16, 64, 256)
REQUEST_TIMEOUT_S = 60.0
WARM_UP_S = 1.0
WARM_UP_STREAMS = 16


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
    agent_cpu_s: float = 0.0  # the platform's agent process
    load: LoadSample | None = None  # the machine while it ran

    @property
    def sample(self) -> LoadSample:
        if self.load is None:
            raise RuntimeError("the level was not measured with a load sample")
        return self.load

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1000 / max(self.requests, 1)

    @property
    def agent_cpu_ms_per_request(self) -> float:
        return self.agent_cpu_s * 1000 / max(self.requests, 1)

    @property
    def per_s(self) -> float:
        return self.requests / self.elapsed_s

    def percentile(self, p: int) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, len(ordered) * p // 100)]


class Stream(Protocol):
    """One worker's way of sending requests: its own connection, or a shared channel."""

    async def request(self) -> int:
        """Sends one request and checks the reply; returns its content messages."""

    async def close(self) -> None: ...


async def run_load(
    open_stream: Callable[[], Stream], streams: int, seconds: float, max_requests: int
) -> Level:
    """``streams`` workers send requests back to back until the time or the count is up."""
    latencies: list[float] = []
    chunks: list[int] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors, issued
        stream = open_stream()
        try:
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                started = time.perf_counter()
                try:
                    count = await stream.request()
                except Exception as error:  # counted and reported, never hidden
                    errors += 1
                    if errors == 1:
                        print(f"  first error: {error!r}", flush=True)
                    continue
                latencies.append(time.perf_counter() - started)
                chunks.append(count)
        finally:
            await stream.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    return Level(streams, len(latencies), errors, time.perf_counter() - started, latencies, chunks)


class _FloorStream:
    """Streams on the floor's one gRPC channel (HTTP/2 multiplexes them)."""

    def __init__(self, channel: grpc.aio.Channel, tokens: int) -> None:
        self._method = channel.unary_stream(FLOOR_METHOD, None, None)  # bytes as they are
        self._tokens = tokens

    async def request(self) -> int:
        count = 0
        async for message in self._method(b"", timeout=REQUEST_TIMEOUT_S):
            count += 1 if message else 0
        if count != self._tokens:
            raise RuntimeError(f"floor streamed {count} messages, expected {self._tokens}")
        return count

    async def close(self) -> None:
        return None


class PlatformStream:
    """Streamed chat completions on a keep-alive HTTP/1.1 connection of its own, each
    checked: HTTP 200, ``[DONE]``, usage of ``tokens`` completion tokens."""

    def __init__(self, base_url: str, api_key: str, tokens: int) -> None:
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self._connection = HttpConnection(
            f"{base_url}/v1/chat/completions",
            json.dumps(body).encode(),
            {"authorization": f"Bearer {api_key}", "content-type": "application/json"},
        )
        self._tokens = tokens

    async def request(self) -> int:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            response = await self._connection.post()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.body!r}")
        content_chunks = 0
        completion_tokens = -1
        done = False
        for event in response.body.split(b"\n\n"):
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", ()):
                if choice.get("delta", {}).get("content"):
                    content_chunks += 1
        if not done or completion_tokens != self._tokens:
            raise RuntimeError(f"stream ended early: done={done}, tokens={completion_tokens}")
        return content_chunks

    async def close(self) -> None:
        await self._connection.close()


async def _measure(
    floor: ServerProcess,
    platform: ServerProcess,
    load: MachineLoad,
    args: argparse.Namespace,
) -> list[tuple[Level, Level]]:
    """Per round and level: (floor, platform), alternating, each with its load sample."""
    async with grpc.aio.insecure_channel(floor.address) as channel:

        def floor_stream() -> Stream:
            return _FloorStream(channel, args.tokens)

        def platform_stream() -> Stream:
            return PlatformStream(platform.address, platform.secret, args.tokens)

        # Unmeasured: caches, first connections.
        for open_stream in (floor_stream, platform_stream):
            await run_load(open_stream, WARM_UP_STREAMS, WARM_UP_S, args.max_requests)
        results = []
        for round_ in range(args.rounds):
            for streams in args.levels:
                pair = []
                for side, open_stream in ((floor, floor_stream), (platform, platform_stream)):
                    label = f"{side.kind}@{streams} r{round_ + 1}"
                    pair.append(await _measured(side, open_stream, streams, load, label, args))
                floor_level, platform_level = pair
                results.append((floor_level, platform_level))
                _print_level(floor_level, platform_level, round_)
        return results


async def _measured(
    server: ServerProcess,
    open_stream: Callable[[], Stream],
    streams: int,
    load: MachineLoad,
    label: str,
    args: argparse.Namespace,
) -> Level:
    agent = server.agent
    await asyncio.to_thread(load.wait_for_quiet)
    before, agent_before = server.cpu_s(), agent.cpu_s() if agent else 0.0
    started = load.start()
    level = await run_load(open_stream, streams, args.seconds, args.max_requests)
    level.load = load.stop(started, label)
    level.server_cpu_s = server.cpu_s() - before
    level.agent_cpu_s = agent.cpu_s() - agent_before if agent else 0.0
    return level


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _print_level(floor: Level, platform: Level, round_: int) -> None:
    chunks = sorted(platform.chunks)
    print(
        f"round {round_ + 1} streams={platform.streams:>3}  floor {floor.per_s:7.0f} req/s "
        f"p50 {_ms(floor.percentile(50))} p99 {_ms(floor.percentile(99))}  |  "
        f"platform {platform.per_s:6.0f} req/s p50 {_ms(platform.percentile(50))} "
        f"p99 {_ms(platform.percentile(99))}  ({platform.requests} requests, "
        f"{platform.errors} errors, {chunks[len(chunks) // 2] if chunks else 0} content "
        f"chunks per request; server CPU per request: floor {floor.cpu_ms_per_request:.2f} ms, "
        f"platform {platform.cpu_ms_per_request:.2f} ms, "
        f"its agent {platform.agent_cpu_ms_per_request:.2f} ms)\n"
        f"  floor: {floor.sample.describe()}\n  platform: {platform.sample.describe()}",
        flush=True,
    )


def _print_table(results: list[tuple[Level, Level]], levels: Sequence[int]) -> None:
    """Per level, each column across rounds: median [min..max] sd (see MARKS)."""
    print(
        "\n| streams | floor req/s | floor p50 ms | floor p99 ms | platform req/s "
        "| platform p50 ms | platform p99 ms | added p50 ms | added p99 ms "
        "| platform CPU ms per request | agent CPU ms per request |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for streams in levels:
        pairs = [(f, p) for f, p in results if p.streams == streams]
        floors, platforms = [f.sample for f, _ in pairs], [p.sample for _, p in pairs]
        both = [worse(f.sample, p.sample) for f, p in pairs]

        def ms(values: Sequence[float], samples: Sequence[LoadSample]) -> str:
            return cell([v * 1000 for v in values], samples, "{:.2f}")

        columns = [
            cell([f.per_s for f, _ in pairs], floors, "{:.0f}"),
            ms([f.percentile(50) for f, _ in pairs], floors),
            ms([f.percentile(99) for f, _ in pairs], floors),
            cell([p.per_s for _, p in pairs], platforms, "{:.0f}"),
            ms([p.percentile(50) for _, p in pairs], platforms),
            ms([p.percentile(99) for _, p in pairs], platforms),
            ms([p.percentile(50) - f.percentile(50) for f, p in pairs], both),
            ms([p.percentile(99) - f.percentile(99) for f, p in pairs], both),
            cell([p.cpu_ms_per_request for _, p in pairs], platforms, "{:.2f}"),
            cell([p.agent_cpu_ms_per_request for _, p in pairs], platforms, "{:.2f}"),
        ]
        print(f"| {streams} | {' | '.join(columns)} |")
    print(MARKS)


# The sides compared by --observability: (name, arguments of the platform side).
_OBSERVABILITY = ("off", "metrics", "metrics + traces")


async def _compare(
    sides: Sequence[ServerProcess], load: MachineLoad, args: argparse.Namespace
) -> list[list[Level]]:
    """The same load on each side (no metrics or tracing, metrics, both), per round
    and level, alternating; one list of levels (one per side) per round and level."""

    def stream_to(side: ServerProcess) -> Callable[[], Stream]:
        return lambda: PlatformStream(side.address, side.secret, args.tokens)

    for side in sides:
        await run_load(stream_to(side), WARM_UP_STREAMS, WARM_UP_S, args.max_requests)
    results = []
    for round_ in range(args.rounds):
        for streams in args.levels:
            measured = [
                await _measured(
                    side, stream_to(side), streams, load, f"{name}@{streams} r{round_ + 1}", args
                )
                for name, side in zip(_OBSERVABILITY, sides, strict=True)
            ]
            results.append(measured)
            print(
                f"round {round_ + 1} streams={streams:>3}  platform CPU per request: "
                + ", ".join(
                    f"{name} {level.cpu_ms_per_request:.2f} ms"
                    + (" (FOREIGN LOAD)" if level.sample.foreign else "")
                    for name, level in zip(_OBSERVABILITY, measured, strict=True)
                )
                + f" ({sum(level.errors for level in measured)} errors)",
                flush=True,
            )
    return results


def _print_comparison(results: list[list[Level]], levels: Sequence[int], spans: int) -> None:
    """Per level, each side's figures across rounds, and its CPU per request over the
    first side's within each round (see MARKS)."""
    names = _OBSERVABILITY
    print(
        "\n| streams | "
        + " | ".join(f"req/s {name}" for name in names)
        + " | "
        + " | ".join(f"platform CPU ms per request, {name}" for name in names)
        + " | "
        + " | ".join(f"agent CPU ms per request, {name}" for name in names)
        + " |"
    )
    print("|---:" * (1 + 3 * len(names)) + "|")
    for streams in levels:
        rows = [sides for sides in results if sides[0].streams == streams]
        cells = []
        for index in range(len(names)):
            levels_ = [sides[index] for sides in rows]
            cells.append(
                cell([lv.per_s for lv in levels_], [lv.sample for lv in levels_], "{:.0f}")
            )
        for index in range(len(names)):
            levels_ = [sides[index] for sides in rows]
            text = cell(
                [lv.cpu_ms_per_request for lv in levels_], [lv.sample for lv in levels_], "{:.2f}"
            )
            if index:
                ratios = [s[index].cpu_ms_per_request / s[0].cpu_ms_per_request - 1 for s in rows]
                pairs = [worse(s[0].sample, s[index].sample) for s in rows]
                text += f" ({cell([100 * r for r in ratios], pairs, '{:+.0f}')} %)"
            cells.append(text)
        for index in range(len(names)):
            levels_ = [sides[index] for sides in rows]
            cells.append(
                cell(
                    [lv.agent_cpu_ms_per_request for lv in levels_],
                    [lv.sample for lv in levels_],
                    "{:.2f}",
                )
            )
        print(f"| {streams} | " + " | ".join(cells) + " |")
    print(MARKS)
    traced = sum(sides[-1].requests for sides in results)
    print(f"\nspans received by the collector: {spans} ({spans / max(traced, 1):.1f} per request)")


def _observability(args: argparse.Namespace) -> None:
    print(
        f"platform without metrics or tracing, with metrics, with both: {args.tokens}-token "
        f"streamed completions, {args.rounds} rounds of {args.seconds:g} s per level and "
        f"side, levels {','.join(map(str, args.levels))}",
        flush=True,
    )
    servers: list[ServerProcess] = []
    with OtlpSink() as sink:
        try:
            servers.append(start_side("platform", args.tokens))
            servers.append(start_side("platform", args.tokens, OBSERVED, ""))
            servers.append(start_side("platform", args.tokens, OBSERVED, sink.endpoint))
            load = MachineLoad(
                databases={side.database for side in servers}, services=frozenset({POSTGRES})
            )
            results = asyncio.run(_compare(servers, load, args))
        finally:
            for server in reversed(servers):
                server.stop()
        _print_comparison(results, args.levels, sink.spans)
    print(load.summary())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per completion")
    parser.add_argument("--seconds", type=float, default=3.0, help="per level, side and round")
    parser.add_argument("--rounds", type=int, default=3, help="of every level and side")
    parser.add_argument(
        "--max-requests", type=int, default=20_000, help="per level, side and round"
    )
    parser.add_argument(
        "--levels",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=LEVELS,
        help="concurrent streams, comma-separated (default 1,16,64,256)",
    )
    parser.add_argument(
        "--observability",
        action="store_true",
        help="compare the platform without metrics or tracing, with metrics, and with "
        "both (exporting to a collector in this process) instead of platform and floor",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        raise SystemExit("--rounds and --seconds must be positive")
    configure_logging("warning")
    if args.observability:
        _observability(args)
        return
    print(
        f"gateway overhead: {args.tokens}-token streamed completions, {args.rounds} rounds of "
        f"{args.seconds:g} s per level and side, levels {','.join(map(str, args.levels))}",
        flush=True,
    )
    servers: list[ServerProcess] = []
    try:
        servers.append(start_side("floor", args.tokens))
        servers.append(start_side("platform", args.tokens))
        floor, platform = servers
        # The backends of the platform's database do the platform's work.
        load = MachineLoad(databases={platform.database}, services=frozenset({POSTGRES}))
        results = asyncio.run(_measure(floor, platform, load, args))
    finally:
        for server in reversed(servers):
            server.stop()
    _print_table(results, args.levels)
    print(load.summary())


if __name__ == "__main__":
    main()
