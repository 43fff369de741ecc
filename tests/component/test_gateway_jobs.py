"""GET /v1/jobs and /v1/jobs/{job_id} through the gateway, on a real platform: a
request made over HTTP is found by its x-request-id with its tokens, cost, timings and
log; every refusal is the OpenAI error envelope."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.common.v1 import inference_logging_pb2 as logging_pb

from gateway.app import create_app
from gateway.server import serve
from tests.doubles.scripted_runtime import DEFAULT_SCRIPT, MODEL_ID, ScriptedRuntime
from tests.harness import Customer, Platform, free_port, running_platform, until


@dataclass
class Gateway:
    platform: Platform
    http: httpx.AsyncClient


@pytest.fixture(scope="module")
async def gateway(postgres_dsn: str) -> AsyncIterator[Gateway]:
    async with running_platform(postgres_dsn) as platform:
        await platform.start_agent(ScriptedRuntime())
        port = free_port()
        started = asyncio.Event()
        task = asyncio.create_task(
            serve(create_app(platform.target), "127.0.0.1", port, started=started)
        )
        await started.wait()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                yield Gateway(platform, http)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _bearer(metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return dict(metadata)


async def _opted_in_customer(gateway: Gateway) -> tuple[Customer, dict[str, str]]:
    customer = await gateway.platform.customer(1_000_000)
    manage = await gateway.platform.key(customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    await account_grpc.AccountServiceStub(gateway.platform.channel).SetAccountInferenceLogging(
        account_pb.SetAccountInferenceLoggingRequest(
            account_id=customer.account_id,
            inference_logging=logging_pb.InferenceLogging(enabled=True),
        ),
        metadata=manage,
    )
    return customer, _bearer(manage)


async def test_a_request_is_found_by_its_request_id_with_its_cost_and_log(
    gateway: Gateway,
) -> None:
    customer, manage = await _opted_in_customer(gateway)
    answer = await gateway.http.post(
        "/v1/chat/completions",
        headers=_bearer(customer.metadata),
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]

    async def listed() -> httpx.Response:
        return await gateway.http.get(
            "/v1/jobs",
            headers=manage,
            params={"request_id": request_id, "outcome": ["finished", "failed"]},
        )

    page = (await until(listed, lambda r: bool(r.json()["data"]))).json()
    assert (page["object"], page["has_more"], page["next_page_token"]) == ("list", False, None)
    [job] = page["data"]
    assert (job["object"], job["request_id"], job["model"], job["status"]) == (
        "job",
        request_id,
        MODEL_ID,
        "finished",
    )
    assert job["usage"]["total_tokens"] == answer.json()["usage"]["total_tokens"]
    assert job["cost_micro_credits"] > 0
    assert job["nodes"][0]["epoch"] == 1
    assert 0 <= job["time_to_first_token_ms"] <= job["duration_ms"]
    assert job["log"] is None

    async def with_log() -> httpx.Response:
        return await gateway.http.get(
            f"/v1/jobs/{job['id']}", headers=manage, params={"with_log": "true"}
        )

    got = (await until(with_log, lambda r: r.json()["log"] is not None)).json()
    [message] = got["log"]["request"]["messages"]
    assert (message["role"], message["content"]) == ("user", "hi")
    assert got["log"]["response"]["choices"][0]["text"] == DEFAULT_SCRIPT


@pytest.mark.parametrize(
    ("path", "params", "key", "status", "param", "code"),
    [
        ("/v1/jobs", {}, "none", 401, None, "invalid_api_key"),
        ("/v1/jobs", {}, "inference", 403, None, "permission_denied"),
        ("/v1/jobs/no-such-job", {}, "management", 404, None, "not_found"),
        ("/v1/jobs", {"limit": "0"}, "management", 400, "limit", None),
        ("/v1/jobs", {"outcome": "lost"}, "management", 400, "outcome.0", None),
        ("/v1/jobs", {"account_id": "nobody"}, "management", 400, "account_id", None),
        ("/v1/jobs", {"page_token": "garbage"}, "management", 400, "page_token", None),
        (
            "/v1/jobs",
            {"created_after": "9", "created_before": "9"},
            "management",
            400,
            "created_after",
            None,
        ),
    ],
)
async def test_refusals_are_the_openai_envelope(
    gateway: Gateway,
    path: str,
    params: dict[str, str],
    key: str,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    customer = await gateway.platform.customer(0)
    headers = {
        "none": {},
        "inference": _bearer(customer.metadata),
        "management": _bearer(
            await gateway.platform.key(customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
        ),
    }[key]
    response = await gateway.http.get(path, headers=headers, params=params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]
