"""The whole platform as users start it: a `resultity up` subprocess.

Started on free ports in a fresh data dir (embedded PostgreSQL unless
``RESULTITY_DATABASE_URL`` is set), ready once the demo key exists and
``GET /v1/models`` lists the model, and always stopped with SIGINT (then
SIGTERM, then SIGKILL if it hangs). ``agent_threads`` sets the local agent's
llama.cpp threads (`resultity up --agent-threads N`). ``extra_agents`` more
nodes join as an operator's would (`resultity agent --network ...` with the
platform operator's node token, README "An extra agent on another machine"),
with the same threads and their own keys; the platform is ready once every
node passed join validation.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

DEMO_KEY_FILE = "demo-api-key"
# Logged by the network when a node fails join validation; it will never serve.
QUARANTINE_LOG_EVENT = "node quarantined"
# Logged by the network when a node passed join validation for a model.
VALIDATED_LOG_EVENT = "model validated"
# The platform operator's node token, which `resultity up` gives its local agent.
NODE_TOKEN_FILE = "node-token"
DATABASE_URL_ENV = "RESULTITY_DATABASE_URL"
STOP_GRACE_S = 60.0
KILL_GRACE_S = 15.0
LOG_TAIL_LINES = 40


class PlatformError(RuntimeError):
    """The platform did not start, or stopped while it was needed."""


@dataclass(frozen=True)
class RunningPlatform:
    base_url: str  # ends with /v1
    api_key: str
    log_path: Path
    commands: tuple[str, ...]
    # Roots of the platform's process trees: `resultity up` (with its local
    # agent), a separate agent, and the embedded PostgreSQL, which detaches.
    process_roots: tuple[int, ...]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def resultity_command() -> list[str]:
    """The `resultity` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "resultity"
    if script.exists():
        return [str(script)]
    found = shutil.which("resultity")
    if found:
        return [found]
    return [sys.executable, "-m", "server.cli"]


@contextmanager
def running_platform(
    model: str,
    *,
    start_timeout_s: float,
    agent_slots: int,
    log_path: Path | None = None,
    agent_threads: int | None = None,
    extra_agents: int = 0,
) -> Iterator[RunningPlatform]:
    """Starts `resultity up`, yields once it serves ``model``, stops it on exit.

    Every agent runs ``agent_slots`` generations at once, passed explicitly
    whatever the commands' defaults, so that results stay comparable."""
    with tempfile.TemporaryDirectory(prefix="resultity-bench-", ignore_cleanup_errors=True) as tmp:
        data_dir = Path(tmp) / "data"
        log_file = log_path or Path(tmp) / "platform.log"
        http_port, grpc_port = free_port(), free_port()
        up = [
            *resultity_command(),
            "up",
            "--data-dir",
            str(data_dir),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--agent-slots",
            str(agent_slots),
        ]
        database_url = os.environ.get(DATABASE_URL_ENV)
        if database_url:
            up += ["--database-url", database_url]
        if agent_threads is not None:
            up += ["--agent-threads", str(agent_threads)]
        base_url = f"http://127.0.0.1:{http_port}/v1"
        deadline = time.monotonic() + start_timeout_s
        processes: list[subprocess.Popen[bytes]] = []
        with log_file.open("wb") as log:
            try:
                processes.append(spawn(up, log))
                api_key = _wait_until_serving(
                    processes, data_dir / DEMO_KEY_FILE, base_url, model, deadline, log_file
                )
                for number in range(1, extra_agents + 1):
                    agent = _agent_command(
                        grpc_port, Path(tmp) / f"agent-{number}", agent_threads, agent_slots
                    )
                    token = (data_dir / NODE_TOKEN_FILE).read_text().strip()
                    processes.append(
                        spawn([*agent, "--name", f"extra-{number}"], log, _with_token(token))
                    )
                _wait_until_validated(processes, 1 + extra_agents, deadline, log_file)
                yield RunningPlatform(
                    base_url,
                    api_key,
                    log_file,
                    tuple(" ".join(_argv(process)) for process in processes),
                    (*(process.pid for process in processes), *_postmaster(data_dir)),
                )
                for process in processes:
                    if process.poll() is not None:
                        raise PlatformError(f"{_label(process)} exited ({process.returncode})")
            except BaseException:
                _stop_all(processes)
                print(log_tail(log_file), file=sys.stderr)
                raise
            _stop_all(processes)


def spawn(
    argv: list[str], log: IO[bytes], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``argv`` with its output in ``log``, in ``env`` (default: this one's)."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )


def _check_alive(processes: list[subprocess.Popen[bytes]], deadline: float, what: str) -> None:
    for process in processes:
        if process.poll() is not None:
            raise PlatformError(f"{_label(process)} exited during start-up ({process.returncode})")
    if time.monotonic() > deadline:
        raise PlatformError(f"the platform did not {what} in time")


def _wait_until_serving(
    processes: list[subprocess.Popen[bytes]],
    key_file: Path,
    base_url: str,
    model: str,
    deadline: float,
    log_file: Path,
) -> str:
    """The demo key, once ``GET /v1/models`` with it lists ``model``."""
    with httpx.Client(timeout=10.0) as http:
        while True:
            _check_alive(processes, deadline, f"serve {model!r}")
            if QUARANTINE_LOG_EVENT in log_file.read_text(errors="replace"):
                raise PlatformError("the network quarantined the agent (join validation failed)")
            if key_file.exists():
                key = key_file.read_text().strip()
                try:
                    response = http.get(
                        f"{base_url}/models", headers={"authorization": f"Bearer {key}"}
                    )
                    if response.status_code == 200 and any(
                        entry.get("id") == model for entry in response.json().get("data", [])
                    ):
                        return key
                except httpx.TransportError:
                    pass  # the gateway is not listening yet
            time.sleep(0.5)


def _agent_command(grpc_port: int, data_dir: Path, threads: int | None, slots: int) -> list[str]:
    command = [
        *resultity_command(),
        "agent",
        "--network",
        f"127.0.0.1:{grpc_port}",
        "--data-dir",
        str(data_dir),
        "--slots",
        str(slots),
    ]
    return command + (["--threads", str(threads)] if threads is not None else [])


def _with_token(node_token: str) -> dict[str, str]:
    return {**os.environ, "RESULTITY_NODE_TOKEN": node_token}


def _wait_until_validated(
    processes: list[subprocess.Popen[bytes]], nodes: int, deadline: float, log_file: Path
) -> None:
    """Until ``nodes`` nodes passed join validation (each logs it once per model)."""
    while True:
        text = log_file.read_text(errors="replace")
        if QUARANTINE_LOG_EVENT in text:
            raise PlatformError("the network quarantined an agent (join validation failed)")
        if text.count(VALIDATED_LOG_EVENT) >= nodes:
            return
        _check_alive(processes, deadline, f"validate {nodes} nodes")
        time.sleep(0.5)


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """The last started first: a separate agent before the control plane."""
    for process in reversed(processes):
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT as Ctrl-C does; escalates only if the platform does not exit."""
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
                f"bench: {_label(process)} still running {grace:.0f} s after "
                f"{signal.Signals(signum).name}",
                file=sys.stderr,
            )


def _postmaster(data_dir: Path) -> tuple[int, ...]:
    """The embedded PostgreSQL's server process, if there is one."""
    try:
        first_line = (data_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0]
        return (int(first_line),)
    except (OSError, ValueError):
        return ()


def _argv(process: subprocess.Popen[bytes]) -> list[str]:
    args = process.args
    return [str(arg) for arg in args] if isinstance(args, list) else [str(args)]


COMMANDS = ("up", "agent", "account", "network", "cloud", "gateway")


def _label(process: subprocess.Popen[bytes]) -> str:
    """ "resultity <command>" of the process's command line, or the module it runs
    (``python -m llama_cpp.server`` for the peer)."""
    argv = _argv(process)
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] != "server.cli":
        return argv[argv.index("-m") + 1]
    command = next((arg for arg in argv if arg in COMMANDS), "up")
    return f"resultity {command}"


def log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    tail = "\n".join(lines[-LOG_TAIL_LINES:])
    return f"--- last lines of {path.name} ({path}) ---\n{tail}"
