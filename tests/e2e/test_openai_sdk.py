"""End to end: `resultity up` as users start it, called with the official SDK.

The platform runs as a subprocess (gateway -> cloud -> network -> agent ->
llama.cpp with the bundled SmolLM2) against the test database; the `openai`
client validates every response strictly.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import openai
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.harness import eventually
from tests.running_platform import MODEL, START_TIMEOUT_S, RunningPlatform

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

pytestmark = pytest.mark.model


async def test_completion_streamed_and_not_gives_the_same_greedy_answer_billed_exactly(
    platform: RunningPlatform,
) -> None:
    client = platform.client()
    model = await platform.price()
    before = await platform.balance()

    completion = await client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,  # type: ignore[arg-type]
    )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = completion.choices[0].message.content
    assert text
    assert "paris" in text.lower()
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0

    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    assert chunks[-1].choices == []
    stream_usage = chunks[-1].usage
    assert stream_usage is not None
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert stream_usage.model_dump() == completion.usage.model_dump()

    spent = before - await platform.balance()
    per_request = (
        completion.usage.prompt_tokens * model.price.prompt_micro_credits_per_token
        + completion.usage.completion_tokens * model.price.completion_micro_credits_per_token
    )
    assert spent == 2 * per_request


async def test_defaults_clients_expect(platform: RunningPlatform) -> None:
    async with httpx.AsyncClient(
        base_url=platform.base_url,
        headers={"authorization": f"Bearer {platform.api_key}"},
        timeout=120,
    ) as http:
        answered = await http.post(
            "/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 4}
        )
        models = (await http.get("/models")).json()["data"]
        unknown_token = await http.post(
            "/chat/completions",
            json={"model": MODEL, "messages": QUESTION, "logit_bias": {"1000000": 5}},
        )

    # resultity up's default limits, reported as OpenAI names them.
    assert answered.status_code == 200
    assert answered.headers["x-ratelimit-limit-requests"] == "600"
    assert answered.headers["x-ratelimit-limit-tokens"] == "1000000"
    for name in ("remaining-requests", "reset-requests", "remaining-tokens", "reset-tokens"):
        assert answered.headers[f"x-ratelimit-{name}"]
    # When the model entered the catalog: this platform's first start, today.
    assert models[0]["created"] > 1_700_000_000
    # Token ids are the model's; the node knows its vocabulary.
    assert unknown_token.status_code == 400
    assert unknown_token.json()["error"]["param"] == "logit_bias"


async def test_responses_api_streamed_and_not(platform: RunningPlatform) -> None:
    client = platform.client()
    whole = await client.responses.create(
        model=MODEL, input=QUESTION, temperature=0, max_output_tokens=16
    )
    stream = await client.responses.create(
        model=MODEL, input=QUESTION, temperature=0, max_output_tokens=16, stream=True
    )
    events = [event async for event in stream]

    assert "paris" in whole.output_text.lower()
    assert events[0].type == "response.created"
    final = events[-1]
    assert final.type in {"response.completed", "response.incomplete"}
    assert final.response.output_text == whole.output_text
    assert final.response.usage is not None
    assert whole.usage is not None
    assert final.response.usage.output_tokens == whole.usage.output_tokens

    # A function call the bundled model makes under the tool's grammar.
    weather = {
        "type": "function",
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
    called = await client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[weather],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=60,
    )
    call = called.output[-1]
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}


async def test_models_lists_the_served_model(platform: RunningPlatform) -> None:
    models = await platform.client().models.list()
    assert [model.id for model in models.data] == [MODEL]


async def test_wrong_key_and_unknown_model_get_openai_errors(platform: RunningPlatform) -> None:
    with pytest.raises(openai.AuthenticationError) as auth:
        await platform.client("rsk_wrong").chat.completions.create(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
        )
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as missing:
        await platform.client().chat.completions.create(
            model="gpt-nothing",
            messages=QUESTION,  # type: ignore[arg-type]
        )
    assert missing.value.code == "model_not_found"


async def test_json_object_format_logprobs_and_several_choices(platform: RunningPlatform) -> None:
    completion = await platform.client().chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": "Give a JSON object with the keys name and color of a cat.",
            }
        ],
        temperature=0,
        max_tokens=60,
        n=2,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
    )

    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content or ""), dict)
        assert choice.logprobs is not None
        assert choice.logprobs.content is not None
        tokens = choice.logprobs.content
        assert b"".join(bytes(item.bytes or []) for item in tokens).decode() == (
            choice.message.content
        )
        assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in tokens)
    # Greedy: both choices are the same text.
    assert completion.choices[0].message.content == completion.choices[1].message.content


class Weather(BaseModel):
    """A weather report."""

    city: str
    celsius: int


async def test_an_agent_framework_gets_tool_calls_from_the_bundled_model(
    platform: RunningPlatform,
) -> None:
    chat = ChatOpenAI(
        model=MODEL,
        base_url=platform.base_url,
        api_key=platform.api_key,  # type: ignore[arg-type]
        max_retries=0,
        temperature=0,
        max_tokens=60,  # type: ignore[call-arg]
    )
    structured = chat.with_structured_output(Weather, method="function_calling")

    report = await structured.ainvoke("Report the weather in Paris.")
    stream = await platform.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_time",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 20}},
                        "required": ["city"],
                    },
                },
            }
        ],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    pieces = [
        call
        async for chunk in stream
        for choice in chunk.choices
        for call in choice.delta.tool_calls or ()
    ]

    assert isinstance(report, Weather)
    assert pieces[0].id is not None
    assert pieces[0].function is not None
    assert pieces[0].function.name == "get_time"
    arguments = json.loads("".join(p.function.arguments or "" for p in pieces if p.function))
    assert isinstance(arguments["city"], str)


async def test_text_completion_continues_a_raw_prompt(platform: RunningPlatform) -> None:
    completion = await platform.client().completions.create(
        model=MODEL, prompt=["The capital of France is", "1, 2, 3,"], temperature=0, max_tokens=8
    )

    assert [choice.index for choice in completion.choices] == [0, 1]
    assert all(choice.text for choice in completion.choices)
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 16


async def test_embeddings_are_unit_vectors_and_billed_per_prompt_token(
    platform: RunningPlatform,
) -> None:
    model = await platform.price()
    before = await platform.balance()

    response = await platform.client().embeddings.create(
        model=MODEL,
        input=["The cat sat on the mat.", "A cat sat on a mat."],
        encoding_format="float",
    )

    assert len(response.data) == 2
    for item in response.data:
        assert sum(value * value for value in item.embedding) == pytest.approx(1.0, abs=1e-5)
    assert len(response.data[0].embedding) == len(response.data[1].embedding)
    assert response.usage.prompt_tokens > 0
    spent = before - await platform.balance()
    assert spent == response.usage.prompt_tokens * model.price.prompt_micro_credits_per_token


async def test_probes_and_grpc_health_report_a_serving_platform(platform: RunningPlatform) -> None:
    root = platform.base_url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{root}/health")).json() == {"status": "ok"}
        # Readiness follows the catalog every 2 s, so it may trail /v1/models briefly.
        for _ in range(60):
            ready = await http.get(f"{root}/ready")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.5)
    assert ready.json() == {"status": "ready"}
    async with grpc.aio.insecure_channel(platform.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in (
            "",
            "resultity.account.v1.LedgerService",
            "resultity.network.v1.DispatchService",
        ):
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_hostile_requests_get_a_400_naming_the_field(platform: RunningPlatform) -> None:
    client = platform.client()
    with pytest.raises(openai.BadRequestError) as schema:
        await client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "numbers",
                    "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 100000},
                },
            },
        )
    assert schema.value.param == "response_format.json_schema.schema"

    with pytest.raises(openai.BadRequestError) as many:
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": ""}] * 100_000,
        )
    assert many.value.param == "messages"


def _children(pid: int, module: str) -> list[psutil.Process]:
    return [
        child for child in psutil.Process(pid).children(recursive=True) if module in _cmdline(child)
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    """Its command line; none for one that exited and was not yet reaped (a zombie)."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


async def _answer_when_served(platform: RunningPlatform) -> str:
    """Asks until the platform answers (a restarting node may refuse for a while)."""
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            try:
                completion = await platform.client().chat.completions.create(
                    model=MODEL,
                    messages=QUESTION,  # type: ignore[arg-type]
                    temperature=0,
                    max_tokens=4,
                )
                return completion.choices[0].message.content or ""
            except (openai.APIStatusError, openai.APIConnectionError):
                await asyncio.sleep(0.5)


# Last in the module: it kills processes of the shared platform.
async def test_a_killed_runtime_worker_and_a_killed_agent_come_back(
    platform: RunningPlatform,
) -> None:
    pid = platform.process.pid
    [worker] = _children(pid, "agent.runtime.worker_main")
    [agent] = [p for p in _children(pid, "agent") if "server.cli" in _cmdline(p)]

    worker.kill()
    await eventually(
        lambda: (
            [p.pid for p in _children(pid, "agent.runtime.worker_main")] not in ([], [worker.pid])
        ),
        timeout_s=60,
    )
    assert await _answer_when_served(platform)
    assert agent.is_running()  # the agent and its session outlived its runtime

    agent.kill()
    await eventually(
        lambda: (
            [p.pid for p in _children(pid, "agent") if "server.cli" in _cmdline(p)]
            not in ([], [agent.pid])
        ),
        timeout_s=60,
    )
    assert await _answer_when_served(platform)
    assert platform.process.returncode is None
