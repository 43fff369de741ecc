"""`resultity subclouds` against a running platform over gRPC: the operator's way
to set up a private environment and hand out its keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Platform, operator_command, running_platform


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


@pytest.fixture
def subclouds_cli(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    return operator_command(platform, monkeypatch, capsys, "subclouds", "--cloud", platform.target)


async def test_create_configure_and_issue_a_key(platform: Platform, subclouds_cli: Any) -> None:
    operator, token = await platform.operator()
    runtime = ScriptedRuntime()
    await platform.start_agent(runtime, "eu", token, region="eu-west")
    owner = await platform.customer(1_000_000)
    member = await platform.customer(1_000_000)

    created = await subclouds_cli(
        "create", "lab", "--owner", owner.account_id, "--model", f"{SMOLLM2_135M.id}=2,5"
    )
    subcloud = created["subcloud"]
    subcloud_id = subcloud["subcloud_id"]
    assert subcloud["models"] == [
        {
            "model": SMOLLM2_135M.id,
            "price": {
                "prompt_micro_credits_per_token": "2",
                "completion_micro_credits_per_token": "5",
            },
        }
    ]
    rules = await subclouds_cli(
        "set-rules", subcloud_id, "--operator", operator, "--region", "eu-west", "--verified-only"
    )
    assert rules["subcloud"]["rules"]["regions"] == ["eu-west"]
    await subclouds_cli("add-member", subcloud_id, member.account_id, "--role", "admin")
    members = await subclouds_cli("members", subcloud_id)
    assert [(m["account_id"], m["role"]) for m in members["members"]] == [
        (owner.account_id, "SUBCLOUD_ROLE_OWNER"),
        (member.account_id, "SUBCLOUD_ROLE_ADMIN"),
    ]

    issued = await subclouds_cli("create-key", subcloud_id, "--account", member.account_id)
    assert issued["account_id"] == member.account_id
    response = await platform.inference.CreateChatCompletion(
        pb.CreateChatCompletionRequest(
            params=pb.ChatCompletionParams(
                model=SMOLLM2_135M.id,
                messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
            )
        ),
        metadata=(("authorization", f"Bearer {issued['secret']}"),),
    )
    assert response.billing.charged_micro_credits == (
        response.usage.prompt_tokens * 2 + response.usage.completion_tokens * 5
    )
    assert len(runtime.started_jobs) == 1

    archived = await subclouds_cli("archive", subcloud_id)
    assert archived["subcloud"]["archived"]
