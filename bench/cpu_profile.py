"""`python -m bench.cpu_profile`: where the control plane's CPU goes per request.

Starts the platform side of bench/gateway.py (gateway, cloud, network and
account in one process, its agent in another), drives streamed completions at
``--streams`` concurrent streams and samples the platform process's event-loop
thread with py-spy (``pip install py-spy``; it needs ptrace rights) for
``--seconds``. Each sample is charged to the layer whose code the sampled task
runs (the outermost gateway/, server/cloud/, server/network/ or server/account/
frame), or to the event loop and gRPC's completion handling when no platform
code is on the stack; within a layer, to the library at the top of the stack.
Prints each layer's share, its CPU milliseconds per request (the thread's CPU
time over the sampling window divided by the requests completed in it), what
the whole process (every thread) spent per request, and the machine's load
during the window (bench/machine_load.py): shares hold under foreign load, the
milliseconds less so.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.gateway import PlatformStream, Stream, run_load
from bench.gateway_sides import start_side
from bench.machine_load import POSTGRES, MachineLoad
from core.logging import configure_logging

# (marker in a frame, layer): the outermost platform frame names the layer.
LAYERS = (
    ("(gateway/", "gateway: HTTP, JSON, SSE"),
    ("(server/cloud/", "cloud: admission, relay, settlement calls"),
    ("(server/network/", "network: dispatch, agent stream"),
    ("(server/account/", "account: ledger SQL"),
)
NO_LAYER = "event loop and gRPC completions"
# Frames every sample starts with (process start-up, the loop's runner): never the library.
ROOT = ("<module>", "multiprocessing/", "bench/gateway_sides.py", "event_loop.py", "runners.py")
# (marker in a frame, library): the innermost library frame names where a layer's time went.
LIBRARIES = (
    ("grpc/", "gRPC"),
    ("asyncio/", "asyncio"),
    ("asyncpg", "asyncpg"),
    ("uvicorn", "uvicorn"),
    ("starlette", "Starlette/FastAPI"),
    ("fastapi", "Starlette/FastAPI"),
    ("anyio", "Starlette/FastAPI"),
    ("pydantic", "pydantic"),
    ("protobuf", "protobuf"),
    ("structlog", "structlog"),
    ("cryptography", "Ed25519"),
)


def classify(raw: Path) -> tuple[int, dict[str, collections.Counter[str]]]:
    """Main-thread samples of a py-spy ``--format raw --threads`` file, by layer and library."""
    total = 0
    layers: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or "MainThread" not in frames[0]:
            continue
        total += int(count)
        platform = [f for f in frames[1:] if "site-packages" not in f]
        layer = next(
            (name for frame in platform for marker, name in LAYERS if marker in frame), NO_LAYER
        )
        # Without a platform frame on the stack, the rest is C: the loop and gRPC's Cython.
        library = "own code and stdlib" if layer != NO_LAYER else "C (loop, gRPC's Cython)"
        for frame in reversed(frames[1:]):
            if any(marker in frame for marker in ROOT):
                break
            found = [name for marker, name in LIBRARIES if marker in frame]
            if found:
                library = found[0]
                break
            if any(marker in frame for marker, _ in LAYERS):
                break
        layers[layer][library] += int(count)
    return total, layers


def _thread_cpu_s(pid: int) -> float:
    """User + system seconds of the process's main thread (its event loop)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / 100.0  # USER_HZ


async def _profile(streams: int, seconds: float, out: Path) -> None:
    beside = Path(sys.executable).parent / "py-spy"  # in this virtual environment
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    platform = start_side("platform", 16)
    try:
        pid = platform.process.pid
        assert pid is not None

        def open_stream() -> Stream:
            return PlatformStream(platform.address, platform.secret, 16)

        await run_load(open_stream, streams, 1.0, 10**6)  # warm-up
        spy = await asyncio.create_subprocess_exec(
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--threads",
            "--output",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # py-spy attaches
        main_before, process_before = _thread_cpu_s(pid), platform.cpu_s()
        load = MachineLoad(databases={platform.database}, services=frozenset({POSTGRES}))
        began = load.start()
        level = await run_load(open_stream, streams, seconds - 0.5, 10**6)
        window = load.stop(began)
        main_ms = (_thread_cpu_s(pid) - main_before) * 1000 / max(level.requests, 1)
        process_ms = (platform.cpu_s() - process_before) * 1000 / max(level.requests, 1)
        await spy.wait()
    finally:
        platform.stop()
    total, layers = classify(out)
    print(
        f"{level.requests} requests at {streams} streams ({level.errors} errors); CPU per "
        f"request: event-loop thread {main_ms:.2f} ms, whole process {process_ms:.2f} ms; "
        f"{total} event-loop samples\nduring the window: {window.describe()}"
    )
    print("\n| layer | share | ms per request | where (share of the layer) |")
    print("|---|---:|---:|---|")
    for layer, libraries in sorted(layers.items(), key=lambda item: -sum(item[1].values())):
        samples = sum(libraries.values())
        where = ", ".join(
            f"{library} {100 * count / samples:.0f}%" for library, count in libraries.most_common(4)
        )
        share = samples / max(total, 1)
        print(f"| {layer} | {100 * share:.0f}% | {share * main_ms:.2f} | {where} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="sampling window")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw samples here")
    args = parser.parse_args(argv)
    configure_logging("warning")
    with tempfile.TemporaryDirectory(prefix="resultity-profile-") as tmp:
        asyncio.run(_profile(args.streams, args.seconds, args.raw or Path(tmp) / "samples.txt"))


if __name__ == "__main__":
    main()
