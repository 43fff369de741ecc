"""The peer baseline: llama-cpp-python's own OpenAI-compatible server, as a subprocess.

`python -m llama_cpp.server` on a free loopback port with the GGUF and the
llama.cpp settings of the direct side (context, batch, threads, flash
attention, q8_0 K/V cache; the chat template from the GGUF on every side),
ready once ``GET /v1/models`` lists the model, always stopped at the end.
``--interrupt_requests False``: with its default, a request arriving while
another streams interrupts it, and concurrent streams end as empty 200s.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import llama_cpp

from bench.clients import SEED
from bench.platform_process import PlatformError, free_port, log_tail, spawn, stop


@dataclass(frozen=True)
class RunningPeer:
    base_url: str  # ends with /v1
    command: str
    pid: int


def peer_command(model_path: Path, model_id: str, port: int, llama: llama_cpp.Llama) -> list[str]:
    """The server's command line, with the settings ``llama`` was loaded with."""
    context = llama.context_params
    settings = {
        "model": str(model_path),
        "model_alias": model_id,
        "host": "127.0.0.1",
        "port": port,
        "interrupt_requests": False,
        "n_ctx": llama.n_ctx(),
        "n_batch": llama.n_batch,
        "n_ubatch": context.n_ubatch,
        "n_threads": llama.n_threads,
        "n_threads_batch": llama.n_threads_batch,
        "flash_attn": True,
        "type_k": context.type_k,
        "type_v": context.type_v,
        "seed": SEED,
        "verbose": False,
    }
    flags = [part for name, value in settings.items() for part in (f"--{name}", str(value))]
    return [sys.executable, "-m", "llama_cpp.server", *flags]


@contextmanager
def running_peer(
    model_path: Path, model_id: str, llama: llama_cpp.Llama, *, start_timeout_s: float
) -> Iterator[RunningPeer]:
    """Starts the server, yields once it lists ``model_id``, stops it on exit."""
    port = free_port()
    argv = peer_command(model_path, model_id, port, llama)
    base_url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryDirectory(prefix="resultity-bench-peer-") as tmp:
        log_file = Path(tmp) / "peer.log"
        with log_file.open("wb") as log:
            process = spawn(argv, log)
            try:
                _wait_until_serving(process, base_url, model_id, time.monotonic() + start_timeout_s)
                yield RunningPeer(base_url, " ".join(argv), process.pid)
                if process.poll() is not None:
                    raise PlatformError(f"the peer server exited ({process.returncode})")
            except BaseException:
                stop(process)
                print(log_tail(log_file), file=sys.stderr)
                raise
            stop(process)


def _wait_until_serving(
    process: subprocess.Popen[bytes], base_url: str, model_id: str, deadline: float
) -> None:
    with httpx.Client(timeout=10.0) as http:
        while True:
            if process.poll() is not None:
                raise PlatformError("the peer server exited during start-up")
            if time.monotonic() > deadline:
                raise PlatformError(f"the peer server did not serve {model_id!r} in time")
            try:
                response = http.get(f"{base_url}/models")
                if response.status_code == 200 and any(
                    entry.get("id") == model_id for entry in response.json().get("data", [])
                ):
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
