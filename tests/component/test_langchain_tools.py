"""LangChain's tool calling against the gateway: ``ChatOpenAI.bind_tools`` and
``with_structured_output(method="function_calling")``, as an agent framework uses
them, over the whole platform in process (scripted node)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from core.inference import ToolCall, ToolChoiceMode
from core.tool_calls import render_calls
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, ScriptedRuntime
from tests.harness import running_platform
from tests.openai_stack import Stack, gateway_stack

PARIS = "What is the weather in Paris?"
REPORT = "Report the weather in Oslo."


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """The weather in a city now."""
    return f"21 degrees {unit} in {city}"


class Weather(BaseModel):
    """A weather report."""

    city: str
    temperature: int


def _block(name: str, arguments: dict[str, object]) -> str:
    return render_calls([ToolCall("", name, json.dumps(arguments))])


@pytest.fixture(scope="module")
def runtime() -> ScriptedRuntime:
    return ScriptedRuntime(
        tool_answers={
            PARIS: _block("get_weather", {"city": "Paris", "unit": "celsius"}),
            REPORT: _block("Weather", {"city": "Oslo", "temperature": 12}),
        }
    )


@pytest.fixture(scope="module")
async def stack(postgres_dsn: str, runtime: ScriptedRuntime) -> AsyncIterator[Stack]:
    async with running_platform(postgres_dsn) as platform, gateway_stack(platform) as running:
        await platform.start_agent(runtime)
        yield running


@pytest.fixture
def chat(stack: Stack) -> ChatOpenAI:
    return ChatOpenAI(
        model=SMOLLM2_135M.id,
        base_url=f"{stack.base_url}/v1",
        api_key=stack.customer.api_key,  # type: ignore[arg-type]
        max_retries=0,
    )


async def test_bind_tools_returns_the_tool_call(chat: ChatOpenAI, runtime: ScriptedRuntime) -> None:
    reply = await chat.bind_tools([get_weather]).ainvoke(PARIS)

    assert isinstance(reply, AIMessage)
    [call] = reply.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris", "unit": "celsius"})
    assert call["id"] is not None
    assert call["id"].startswith("call_")
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    offered = runtime.started_jobs[-1].tool_use
    assert offered is not None
    assert offered.mode is ToolChoiceMode.AUTO


async def test_bind_tools_streams_the_tool_call(chat: ChatOpenAI) -> None:
    merged: AIMessageChunk | None = None
    async for chunk in chat.bind_tools([get_weather]).astream(PARIS):
        assert isinstance(chunk, AIMessageChunk)
        merged = chunk if merged is None else merged + chunk

    assert merged is not None
    [call] = merged.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris", "unit": "celsius"})


async def test_an_agent_loop_sends_the_result_back(
    chat: ChatOpenAI, runtime: ScriptedRuntime
) -> None:
    bound = chat.bind_tools([get_weather])
    question = HumanMessage(PARIS)
    asked = await bound.ainvoke([question])
    assert isinstance(asked, AIMessage)
    [call] = asked.tool_calls
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])

    answered = await bound.ainvoke([question, asked, result])

    assert answered.content == DEFAULT_SCRIPT
    sent = runtime.started_jobs[-1].messages
    assert sent[-1].tool_call_id == call["id"]
    assert sent[-1].content == "21 degrees celsius in Paris"


async def test_structured_output_by_function_calling(
    chat: ChatOpenAI, runtime: ScriptedRuntime
) -> None:
    structured = chat.with_structured_output(Weather, method="function_calling")

    report = await structured.ainvoke(REPORT)

    assert report == Weather(city="Oslo", temperature=12)
    offered = runtime.started_jobs[-1].tool_use
    assert offered is not None
    assert (offered.mode, offered.function) == (ToolChoiceMode.FUNCTION, "Weather")
