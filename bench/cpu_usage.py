"""CPU time spent per completion, by process, to see where the platform's cost goes.

The platform's processes are `resultity up` (gateway, cloud, network and
account in one event loop), its local agent (session, and llama.cpp in the
agent's runtime worker process) and the
embedded PostgreSQL; the bench process itself is the HTTP client on the
platform side and llama.cpp + llama-cpp-python on the direct side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import psutil

T = TypeVar("T")

CPU_ROLES = ("bench", "up", "agent", "postgres", "peer")


def _role(process: psutil.Process) -> str:
    if "postgres" in process.name():
        return "postgres"
    if "bench.peer_server" in process.cmdline():  # the peer baseline (bench/peer_process.py)
        return "peer"
    # `resultity agent` and its runtime worker (`python -m agent.runtime.worker_main`).
    node = any(arg == "agent" or arg.startswith("agent.") for arg in process.cmdline())
    return "agent" if node else "up"


def cpu_seconds(roots: Sequence[int]) -> dict[str, float]:
    """user + system seconds so far of this process and of the trees under ``roots``."""
    times = psutil.Process().cpu_times()
    out = dict.fromkeys(CPU_ROLES, 0.0)
    out["bench"] = times.user + times.system
    for root_pid in roots:
        try:
            root = psutil.Process(root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in tree:
            try:
                role = _role(process)
                times = process.cpu_times()
            except psutil.Error:
                continue  # exited meanwhile
            out[role] += times.user + times.system
    return out


def wait_until_idle(
    roots: Sequence[int], *, timeout_s: float = 30.0, window_s: float = 0.3, busy: float = 0.25
) -> float:
    """Waits until the platform's processes use under ``busy`` of a core over a
    ``window_s`` window (e.g. a disguised canary the network sent the node has
    finished), at most ``timeout_s``; returns the seconds waited."""
    began = time.monotonic()
    if not roots:
        return 0.0
    while time.monotonic() - began < timeout_s:
        before = cpu_seconds(roots)
        time.sleep(window_s)
        after = cpu_seconds(roots)
        used = sum(after[role] - before[role] for role in CPU_ROLES if role != "bench")
        if used < busy * window_s:
            break
    return time.monotonic() - began


def measured(run: Callable[[], T], roots: Sequence[int]) -> tuple[T, dict[str, float]]:
    """``run()`` and the CPU seconds each role spent while it ran."""
    before = cpu_seconds(roots)
    result = run()
    after = cpu_seconds(roots)
    return result, {role: after[role] - before[role] for role in CPU_ROLES}
