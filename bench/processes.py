"""Servers a benchmark starts as subprocesses, and always stops.

A ``ProcessGroup`` (``supervised``) spawns its processes with their output in
one log file, waits until a readiness check passes (failing as soon as one of
them exits, or at a deadline), and on leaving checks that none exited while
it was in use, then stops them all, the last started first: SIGINT as Ctrl-C
does, escalating to SIGTERM and SIGKILL only if one hangs. When anything
failed, the log's tail goes to stderr. Readiness checks: ``lists_model`` (an
OpenAI-compatible server serves a model), ``accepts`` (a port listens).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

import httpx
import psutil

STOP_GRACE_S = 60.0
KILL_GRACE_S = 15.0
LOG_TAIL_LINES = 40
POLL_S = 0.5
# The `resultity` commands a process may run, to name it in errors.
COMMANDS = ("up", "agent", "account", "network", "cloud", "gateway")

T = TypeVar("T")


class ProcessError(RuntimeError):
    """A server the benchmark started did not start, or stopped while it was needed."""


class ProcessGroup:
    """Processes spawned into one log, stopped together."""

    def __init__(self, log: IO[bytes]) -> None:
        self._log = log
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Spawns ``argv`` (in ``env``, default this one's); its pid."""
        process = spawn(argv, self._log, env)
        self.processes.append(process)
        return process.pid

    def wait_until(self, ready: Callable[[], T | None], deadline: float, what: str) -> T:
        """Polls ``ready`` until it returns a value, which it returns; raises if a
        process exits first or ``deadline`` (monotonic) passes. ``what`` names the
        wait in the error ("the platform to serve 'm'")."""
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise ProcessError(
                        f"{label(process)} exited during start-up ({process.returncode})"
                    )
            found = ready()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise ProcessError(f"timed out waiting for {what}")
            time.sleep(POLL_S)

    def commands(self) -> tuple[str, ...]:
        return tuple(" ".join(argv(process)) for process in self.processes)

    def check_running(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise ProcessError(f"{label(process)} exited ({process.returncode})")

    def stop_all(self) -> None:
        # The last started first: a separate agent before the control plane.
        for process in reversed(self.processes):
            stop(process)


@contextmanager
def supervised(log_file: Path) -> Iterator[ProcessGroup]:
    """A group whose processes log to ``log_file``; see the module's docstring."""
    with log_file.open("wb") as log:
        group = ProcessGroup(log)
        try:
            yield group
            group.check_running()
        except BaseException:
            group.stop_all()
            print(log_tail(log_file), file=sys.stderr)
            raise
        group.stop_all()


def lists_model(
    http: httpx.Client, base_url: str, model: str, headers: Mapping[str, str] | None = None
) -> bool:
    """Whether an OpenAI-compatible server's ``GET /models`` lists ``model`` (False
    while it is not listening yet)."""
    try:
        response = http.get(f"{base_url}/models", headers=headers)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and any(
        entry.get("id") == model for entry in response.json().get("data", [])
    )


def accepts(address: str) -> bool:
    """Whether something accepts connections at ``address`` (HOST:PORT)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=POLL_S):
            return True
    except OSError:
        return False


def cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds so far of ``process``; 0 once it is gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spawn(
    command: list[str], log: IO[bytes], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``command`` with its output in ``log``, in ``env`` (default: this one's)."""
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT as Ctrl-C does; escalates only if the process does not exit."""
    for signum, grace in (
        (signal.SIGINT, STOP_GRACE_S),
        (signal.SIGTERM, KILL_GRACE_S),
        (signal.SIGKILL, KILL_GRACE_S),
    ):
        if process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            print(
                f"bench: {label(process)} still running {grace:.0f} s after "
                f"{signal.Signals(signum).name}",
                file=sys.stderr,
            )


def argv(process: subprocess.Popen[bytes]) -> list[str]:
    args = process.args
    return [str(arg) for arg in args] if isinstance(args, list) else [str(args)]


def label(process: subprocess.Popen[bytes]) -> str:
    """ "resultity <command>" of the process's command line, or the module it runs
    (``python -m llama_cpp.server`` for the peer)."""
    command_line = argv(process)
    if "-m" in command_line[:-1] and command_line[command_line.index("-m") + 1] != "server.cli":
        return command_line[command_line.index("-m") + 1]
    command = next((arg for arg in command_line if arg in COMMANDS), "up")
    return f"resultity {command}"


def log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    return f"--- last lines of {path.name} ({path}) ---\n{tail}"
