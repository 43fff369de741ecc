"""A partner in another language: the Node.js client in examples/node, built from
proto/ alone with @grpc/grpc-js and @grpc/proto-loader (installed from npm into
examples/node/node_modules, gitignored, on first run), streams a chat completion
from the platform and decodes the google.rpc.ErrorInfo of a refused call.

Marked `node` (`make test-node`, run by .ci/run): `make test` needs no npm.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.grpc_errors import ERROR_DOMAIN
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime, scripted_tokens
from tests.harness import Platform, running_platform

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "examples" / "node"
NPM_TIMEOUT_S = 300


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


async def _run(*command: str, timeout_s: float = 120) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=CLIENT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def _installed() -> None:
    """The client's packages, as its lockfile pins them; npm leaves an installed
    tree as it is."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} is not installed"
    await _run("npm", "install", "--no-audit", "--no-fund", timeout_s=NPM_TIMEOUT_S)


async def test_a_node_client_streams_and_decodes_error_info(platform: Platform) -> None:
    await _installed()
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)

    output = await _run(
        "node", "chat_stream.js", platform.target, customer.api_key, SMOLLM2_135M.id
    )

    result = json.loads(output)
    streamed = result["streamed"]
    assert streamed["deltas"] == scripted_tokens(DEFAULT_SCRIPT)[:3]
    assert streamed["finish"] == "FINISH_REASON_LENGTH"
    assert streamed["usage"]["completion_tokens"] == "3"
    failed = result["failed"]
    assert failed["code"] == "NOT_FOUND"
    assert failed["info"]["reason"] == "MODEL_NOT_FOUND"
    assert failed["info"]["domain"] == ERROR_DOMAIN
    assert failed["info"]["status_code"] == 5  # google.rpc.Code NOT_FOUND
