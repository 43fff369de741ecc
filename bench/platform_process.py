"""The whole platform as users start it: a `resultity up` subprocess.

Started on free ports in a fresh data dir (embedded PostgreSQL unless
``RESULTITY_DATABASE_URL`` is set), ready once the demo key exists and
``GET /v1/models`` lists the model, and always stopped with SIGINT (then
SIGTERM, then SIGKILL if it hangs; bench/processes.py). ``agent_threads`` sets the local agent's
llama.cpp threads (`resultity up --agent-threads N`). ``extra_agents`` more
nodes join as an operator's would (`resultity agent --network ...` with the
platform operator's node token, README "An extra agent on another machine"),
with the same threads and their own keys; the platform is ready once every
node passed join validation.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.processes import ProcessError, ProcessGroup, free_port, lists_model, supervised

DEMO_KEY_FILE = "demo-api-key"
# Logged by the network when a node fails join validation; it will never serve.
QUARANTINE_LOG_EVENT = "node quarantined"
# Logged by the network when a node passed join validation for a model.
VALIDATED_LOG_EVENT = "model validated"
# The platform operator's node token, which `resultity up` gives its local agent.
NODE_TOKEN_FILE = "node-token"
DATABASE_URL_ENV = "RESULTITY_DATABASE_URL"


@dataclass(frozen=True)
class RunningPlatform:
    base_url: str  # ends with /v1
    api_key: str
    log_path: Path
    commands: tuple[str, ...]
    # Roots of the platform's process trees: `resultity up` (with its local
    # agent), a separate agent, and the embedded PostgreSQL, which detaches.
    process_roots: tuple[int, ...]


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
        with supervised(log_file) as group:
            group.start(up)
            api_key = _wait_until_serving(
                group, data_dir / DEMO_KEY_FILE, base_url, model, deadline, log_file
            )
            for number in range(1, extra_agents + 1):
                agent = _agent_command(
                    grpc_port, Path(tmp) / f"agent-{number}", agent_threads, agent_slots
                )
                token = (data_dir / NODE_TOKEN_FILE).read_text().strip()
                group.start([*agent, "--name", f"extra-{number}"], _with_token(token))
            _wait_until_validated(group, 1 + extra_agents, deadline, log_file)
            yield RunningPlatform(
                base_url,
                api_key,
                log_file,
                group.commands(),
                (*(process.pid for process in group.processes), *_postmaster(data_dir)),
            )


def _wait_until_serving(
    group: ProcessGroup,
    key_file: Path,
    base_url: str,
    model: str,
    deadline: float,
    log_file: Path,
) -> str:
    """The demo key, once ``GET /v1/models`` with it lists ``model``."""
    with httpx.Client(timeout=10.0) as http:

        def serving() -> str | None:
            if QUARANTINE_LOG_EVENT in log_file.read_text(errors="replace"):
                raise ProcessError("the network quarantined the agent (join validation failed)")
            if not key_file.exists():
                return None
            key = key_file.read_text().strip()
            listed = lists_model(http, base_url, model, {"authorization": f"Bearer {key}"})
            return key if listed else None

        return group.wait_until(serving, deadline, f"the platform to serve {model!r}")


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


def _wait_until_validated(group: ProcessGroup, nodes: int, deadline: float, log_file: Path) -> None:
    """Until ``nodes`` nodes passed join validation (each logs it once per model)."""

    def validated() -> bool | None:
        text = log_file.read_text(errors="replace")
        if QUARANTINE_LOG_EVENT in text:
            raise ProcessError("the network quarantined an agent (join validation failed)")
        return True if text.count(VALIDATED_LOG_EVENT) >= nodes else None

    group.wait_until(validated, deadline, f"{nodes} nodes to pass join validation")


def _postmaster(data_dir: Path) -> tuple[int, ...]:
    """The embedded PostgreSQL's server process, if there is one."""
    try:
        first_line = (data_dir / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0]
        return (int(first_line),)
    except (OSError, ValueError):
        return ()
