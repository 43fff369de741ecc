"""`resultity jobs` and the inference logging commands against a running platform over
gRPC: an account opts in, makes a request, and reads its job and log back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, MODEL_ID, ScriptedRuntime
from tests.harness import Platform, operator_command, running_platform, until


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        await running.start_agent(ScriptedRuntime())
        yield running


@pytest.fixture
def cli(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """`resultity <argv>` with the service token, returning the JSON it printed."""
    return operator_command(platform, monkeypatch, capsys)


async def test_an_opted_in_request_is_listed_and_read_back_with_its_log(
    platform: Platform, cli: Any
) -> None:
    customer = await platform.customer(1_000_000)
    target = ("--target", platform.target)
    opted = await cli(
        "account",
        *target,
        "set-inference-logging",
        customer.account_id,
        "--on",
        "--retention-days",
        "7",
    )
    assert opted["account"]["inference_logging"] == {"enabled": True, "retention_days": 7}
    await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(
                model=MODEL_ID,
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
            )
        ),
        metadata=(*customer.metadata, ("x-request-id", "req-cli")),
    )

    jobs = ("jobs", "--cloud", platform.target)
    listed = await cli(
        *jobs,
        "list",
        "--account",
        customer.account_id,
        "--outcome",
        "finished",
        "--since",
        "1h",
        "--json",
    )
    while not listed.get("jobs"):  # written behind the request
        listed = await cli(*jobs, "list", "--request-id", "req-cli", "--json")
    [job] = listed["jobs"]
    assert (job["request_id"], job["model"], job["outcome"]) == (
        "req-cli",
        MODEL_ID,
        "JOB_OUTCOME_FINISHED",
    )
    got = await until(
        lambda: cli(*jobs, "get", job["job_id"], "--with-log", "--json"),
        lambda found: "log" in found,
    )
    assert got["log"]["response"]["choices"][0]["text"] == DEFAULT_SCRIPT

    off = await cli("account", *target, "set-inference-logging", customer.account_id, "--off")
    assert off["account"]["inference_logging"] == {"retention_days": 30}
