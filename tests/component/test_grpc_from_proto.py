"""A partner's view: call cloud with nothing but the .proto files.

The test compiles proto/resultity/{cloud,common}/v1 with grpc_tools into a
temporary directory and runs a client in a separate Python process that
imports only those freshly generated modules (it checks where they come from),
so the contract alone, not the project's committed stubs, is exercised.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import pytest

from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime, scripted_tokens
from tests.harness import Platform, running_platform

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("resultity/cloud/v1/inference_service.proto", "resultity/common/v1/inference.proto")

CLIENT = """
import json, sys
import grpc
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common

assert pb.__file__.startswith(sys.argv[1]), pb.__file__
target, key, model = sys.argv[2:5]
metadata = (("authorization", "Bearer " + key),)
with grpc.insecure_channel(target) as channel:
    stub = pb_grpc.InferenceServiceStub(channel)
    models = stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    params = pb.ChatCompletionParams(
        model=model,
        messages=[common.ChatMessage(role=common.CHAT_ROLE_USER, content="hello there")],
        max_tokens=3,
    )
    whole = stub.CreateChatCompletion(
        pb.CreateChatCompletionRequest(params=params), metadata=metadata
    )
    streamed = list(stub.StreamChatCompletion(
        pb.StreamChatCompletionRequest(params=params), metadata=metadata
    ))
    try:
        stub.CreateChatCompletion(pb.CreateChatCompletionRequest(params=params))
        refused = None
    except grpc.RpcError as error:
        refused = error.code().name
print(json.dumps({
    "models": [m.id for m in models.models],
    "content": whole.choices[0].message.content,
    "finish": common.FinishReason.Name(whole.choices[0].finish_reason),
    "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens],
    "charged": whole.billing.charged_micro_credits,
    "deltas": [d.content for m in streamed for d in m.choices],
    "stream_usage": streamed[-1].usage.completion_tokens,
    "without_key": refused,
}))
"""


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


async def _run(*command: str, cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_cloud_answers_a_client_generated_from_the_protos(
    platform: Platform, tmp_path: Path
) -> None:
    await platform.start_agent(ScriptedRuntime())
    customer = await platform.customer(credits=1_000_000)
    well_known = str(resources.files("grpc_tools") / "_proto")
    await _run(
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{well_known}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *(str(ROOT / "proto" / proto) for proto in PROTOS),
        cwd=tmp_path,
    )
    # Regular packages, so these shadow any other `resultity` on the path.
    for folder in [tmp_path / "resultity", *(tmp_path / "resultity").rglob("*")]:
        if folder.is_dir():
            (folder / "__init__.py").touch()
    (tmp_path / "client.py").write_text(CLIENT)

    output = await _run(
        sys.executable,
        "client.py",
        str(tmp_path),
        platform.target,
        customer.api_key,
        SMOLLM2_135M.id,
        cwd=tmp_path,
    )

    result = json.loads(output)
    three = scripted_tokens(DEFAULT_SCRIPT)[:3]
    assert result["models"] == [SMOLLM2_135M.id]
    assert result["content"] == "".join(three)
    assert result["finish"] == "FINISH_REASON_LENGTH"
    assert result["usage"] == [4, 3]
    assert result["charged"] == 4 * SMOLLM2_135M.price.prompt + 3 * SMOLLM2_135M.price.completion
    assert [d for d in result["deltas"] if d] == three
    assert result["stream_usage"] == 3
    assert result["without_key"] == "UNAUTHENTICATED"
