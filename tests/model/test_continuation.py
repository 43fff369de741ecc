"""Continuing a reply with the real SmolLM2 model: greedy continuation is exact.

In-process, the runtime is interrupted after k tokens and continued from them;
across processes, the agent serving a job is killed mid-stream and another
agent process finishes it. Either way the text equals an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from resultity.network.v1 import dispatch_service_pb2 as dispatch_pb
from resultity.network.v1 import dispatch_service_pb2_grpc as dispatch_grpc

from agent.runtime.base import Finished, GenerationRequest, TokenText
from agent.runtime.llama_cpp import LlamaCppRuntime
from agent.runtime.models import DEFAULT_MODEL_ID, smollm2_gguf_path
from core import channels
from core.convert.generation import spec_to_pb
from core.inference import (
    ChatMessage,
    ChatRole,
    Continuation,
    FunctionTool,
    GenerationSpec,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    ToolChoiceMode,
    ToolUse,
)
from tests.harness import NetworkServer, eventually, start_network

REPO = Path(__file__).resolve().parents[2]
PROMPTS = (
    "Write a long story about a dragon.",
    "List ten fruits with an emoji for each 🍎 and describe them.",
)
MAX_TOKENS = 48


@pytest.fixture(scope="module")
async def runtime() -> AsyncIterator[LlamaCppRuntime]:
    loaded = await LlamaCppRuntime.load(DEFAULT_MODEL_ID, smollm2_gguf_path(), context_length=512)
    yield loaded
    await loaded.close()


def _request(
    prompt: str,
    max_tokens: int,
    continuation: Continuation | None = None,
    tool_use: ToolUse | None = None,
    **sampling: Any,
) -> GenerationRequest:
    return GenerationRequest(
        model=DEFAULT_MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, prompt),),
        sampling=Sampling(max_tokens=max_tokens, temperature=0.0, **sampling),
        max_prompt_tokens=400,
        continuation=continuation,
        tool_use=tool_use,
    )


async def _run(
    runtime: LlamaCppRuntime, request: GenerationRequest
) -> tuple[list[TokenText], Finished]:
    events = [event async for event in runtime.generate(request)]
    finished = events[-1]
    assert isinstance(finished, Finished)
    return [event for event in events if isinstance(event, TokenText)], finished


def _cut(events: list[TokenText], tokens: int) -> int:
    """The fewest leading events that carry at least ``tokens`` tokens."""
    total = 0
    for index, event in enumerate(events):
        total += event.token_count
        if total >= tokens:
            return index + 1
    return len(events)


# A continued reply must go on under the same constraints: the JSON grammar (and
# the tool calls' grammar) has already consumed the delivered prefix, and the
# penalties have counted it.
CONSTRAINED: dict[str, dict[str, Any]] = {
    "free text": {},
    "json object": {"response_format": ResponseFormat(ResponseFormatType.JSON_OBJECT)},
    "json schema": {
        "response_format": ResponseFormat(
            ResponseFormatType.JSON_SCHEMA,
            json.dumps(
                {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "fruits": {"type": "array"}},
                    "required": ["name", "fruits"],
                }
            ),
        )
    },
    "penalties": {"presence_penalty": 1.5, "frequency_penalty": 1.0},
    "tool call": {
        "tool_use": ToolUse(
            (FunctionTool("list_fruits", "Lists fruits", json.dumps({"type": "object"})),),
            ToolChoiceMode.REQUIRED,
        )
    },
}


@pytest.mark.model
@pytest.mark.parametrize(
    ("prompt", "constraint"),
    [(prompt, "free text") for prompt in PROMPTS]
    + [(PROMPTS[1], constraint) for constraint in sorted(CONSTRAINED) if constraint != "free text"],
)
async def test_greedy_continuation_equals_the_uninterrupted_run(
    runtime: LlamaCppRuntime, prompt: str, constraint: str
) -> None:
    sampling = CONSTRAINED[constraint]
    whole, _ = await _run(runtime, _request(prompt, MAX_TOKENS, **sampling))
    expected = "".join(event.text for event in whole)
    cuts = {_cut(whole, k) for k in (1, 7, 20)}
    for cut in sorted(cuts):
        # What a node lost after ``cut`` events had delivered; text it still
        # held back (a split character) was never delivered.
        head = whole[:cut]
        delivered = Continuation(
            text="".join(event.text for event in head),
            token_count=sum(event.token_count for event in head),
            token_ids=tuple(token for event in head for token in event.token_ids),
        )
        assert len(delivered.token_ids) == delivered.token_count
        left = MAX_TOKENS - delivered.token_count
        rest, finished = await _run(runtime, _request(prompt, left, delivered, **sampling))
        assert delivered.text + "".join(event.text for event in rest) == expected, cut
        assert finished.completion_tokens == sum(event.token_count for event in rest)


@pytest.mark.model
async def test_continuation_from_text_alone_still_continues_the_same_turn(
    runtime: LlamaCppRuntime,
) -> None:
    """Without token ids the text is re-tokenized: the reply goes on, not a new turn."""
    head, _ = await _run(runtime, _request(PROMPTS[0], 10))
    text = "".join(event.text for event in head)
    rest, finished = await _run(runtime, _request(PROMPTS[0], 10, Continuation(text, 10)))
    assert finished.completion_tokens == 10
    assert "".join(event.text for event in rest).strip()
    assert "<|im_start|>" not in "".join(event.text for event in rest)


async def _spawn_agent(target: str, name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.cli",
        "agent",
        "--network",
        target,
        "--name",
        name,
        "--context-length",
        "512",
        "--threads",
        "1",
        # Each agent its own key, so each is its own node.
        "--data-dir",
        tempfile.mkdtemp(prefix=f"agent-{name}-"),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _stream(
    network: NetworkServer, job_id: str, events: list[dispatch_pb.RunJobResponse]
) -> None:
    spec = GenerationSpec(
        model=DEFAULT_MODEL_ID,
        messages=(ChatMessage(ChatRole.USER, PROMPTS[0]),),
        sampling=Sampling(max_tokens=MAX_TOKENS, temperature=0.0),
        max_prompt_tokens=400,
    )
    async with channels.insecure_channel(network.target) as channel:
        call = dispatch_grpc.DispatchServiceStub(channel).RunJob(
            dispatch_pb.RunJobRequest(job_id=job_id, spec=spec_to_pb(spec)),
            metadata=network.service,
        )
        async for event in call:
            events.append(event)


def _text(events: list[dispatch_pb.RunJobResponse]) -> str:
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")


def _tokens(events: list[dispatch_pb.RunJobResponse]) -> int:
    return sum(e.delta.token_count for e in events if e.WhichOneof("event") == "delta")


@pytest.mark.model
async def test_killed_agent_process_is_continued_exactly_by_another(postgres_dsn: str) -> None:
    network = await start_network(postgres_dsn)
    processes = [await _spawn_agent(network.target, name) for name in ("a", "b")]
    service = network.component.service
    try:
        await eventually(lambda: len(service.nodes()) == 2, timeout_s=120)
        reference: list[dispatch_pb.RunJobResponse] = []
        await asyncio.wait_for(_stream(network, "reference", reference), timeout=120)

        events: list[dispatch_pb.RunJobResponse] = []
        job = asyncio.create_task(_stream(network, "interrupted", events))
        await eventually(lambda: _tokens(events) >= 8, timeout_s=120)
        victim_id = events[0].assigned.node_id
        victim = processes[["a", "b"].index(service.node(victim_id).hello.name)]
        # Freeze first so that it stops at once, then kill: its stream breaks.
        os.kill(victim.pid, signal.SIGSTOP)
        victim.kill()
        await asyncio.wait_for(job, timeout=120)

        assert [e for e in events if e.WhichOneof("event") == "migrated"]
        assert _text(events) == _text(reference)
        assert _tokens(events) == _tokens(reference)
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.wait()
        await network.stop()
