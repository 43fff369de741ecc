"""The peer baseline: llama-cpp-python's own OpenAI-compatible server, as a subprocess.

`python -m llama_cpp.server` (through bench/peer_server.py, which turns llama.cpp's
repacked CPU buffers off as the other sides do) on a free loopback port with the
GGUF and the llama.cpp settings of the direct side (context, batch, threads, flash
attention, q8_0 K/V cache; the chat template from the GGUF on every side),
ready once ``GET /v1/models`` lists the model, always stopped at the end.
``--interrupt_requests False``: with its default, a request arriving while
another streams interrupts it, and concurrent streams end as empty 200s.
"""

from __future__ import annotations

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
from bench.processes import free_port, lists_model, supervised


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
    return [sys.executable, "-m", "bench.peer_server", *flags]


@contextmanager
def running_peer(
    model_path: Path, model_id: str, llama: llama_cpp.Llama, *, start_timeout_s: float
) -> Iterator[RunningPeer]:
    """Starts the server, yields once it lists ``model_id``, stops it on exit."""
    port = free_port()
    command = peer_command(model_path, model_id, port, llama)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + start_timeout_s
    with (
        tempfile.TemporaryDirectory(prefix="resultity-bench-peer-") as tmp,
        supervised(Path(tmp) / "peer.log") as group,
        httpx.Client(timeout=10.0) as http,
    ):
        pid = group.start(command)
        group.wait_until(
            lambda: True if lists_model(http, base_url, model_id) else None,
            deadline,
            f"the peer server to serve {model_id!r}",
        )
        yield RunningPeer(base_url, " ".join(command), pid)
