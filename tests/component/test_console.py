"""The web console over an in-process platform, driven over HTTP without a browser
(tests/browser drives it in Chromium): sessions, CSRF, what each kind of key sees."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.cloud.v1 import inference_service_pb2 as cloud_pb
from resultity.common.v1 import inference_pb2 as common_pb

from gateway.app import create_app
from gateway.console import ConsoleTargets
from gateway.console.sessions import SealedSession, SessionStore, SessionsUnavailable
from server.network.catalog import SMOLLM2_135M
from tests.doubles.scripted_runtime import ScriptedRuntime
from tests.harness import Platform, running_platform, until

BASE = "http://console.test"


@pytest.fixture
async def platform(postgres_dsn: str) -> AsyncIterator[Platform]:
    async with running_platform(postgres_dsn) as running:
        yield running


@pytest.fixture
async def web(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        platform.target, console=ConsoleTargets(platform.target, platform.target, platform.target)
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client,
    ):
        yield client


async def _key(platform: Platform, account_id: str, *scopes: int) -> str:
    issued = await keys_grpc.ApiKeyServiceStub(platform.channel).CreateApiKey(
        keys_pb.CreateApiKeyRequest(account_id=account_id, name="console", scopes=scopes),
        metadata=platform.service,
    )
    return issued.secret


async def _sign_in(web: httpx.AsyncClient, key: str) -> httpx.Response:
    return await web.post("/console/sign-in", data={"api_key": key}, headers={"origin": BASE})


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


async def test_sign_in_refuses_unknown_and_inference_keys_and_keeps_the_key_server_side(
    platform: Platform, web: httpx.AsyncClient
) -> None:
    customer = await platform.customer(credits=2_000_000)
    assert (await web.get("/console/usage")).headers["location"] == "/console/sign-in"
    unknown = await _sign_in(web, "rsk_" + "x" * 40)
    assert unknown.status_code == 401
    assert "unknown, revoked or expired" in unknown.text
    inference_only = await _sign_in(web, customer.api_key)
    assert inference_only.status_code == 403
    assert "no management scope" in inference_only.text

    key = await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    signed_in = await _sign_in(web, key)
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"]
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert key not in cookie
    page = await web.get("/console/usage")
    assert page.status_code == 200
    assert "2.00" in page.text  # the balance, in credits
    assert key not in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    # Someone else's site cannot post the sign-in form.
    forged = await web.post(
        "/console/sign-in", data={"api_key": key}, headers={"origin": "https://evil.test"}
    )
    assert forged.status_code == 403


async def test_keys_are_created_once_shown_and_revoked_only_with_the_csrf_token(
    platform: Platform, web: httpx.AsyncClient
) -> None:
    customer = await platform.customer(credits=0)
    await _sign_in(web, await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT))
    keys_page = await web.get("/console/keys")
    token = _csrf(keys_page)
    refused = await web.post(
        "/console/keys", data={"name": "ci", "csrf": "wrong"}, headers={"origin": BASE}
    )
    assert refused.status_code == 403
    created = await web.post(
        "/console/keys",
        data={"name": "ci", "scope": ["inference"], "csrf": token},
        headers={"origin": BASE},
    )
    assert created.status_code == 303
    shown = await web.get("/console/keys")
    secret = re.search(r'data-testid="new-secret">(rsk_[^<]+)<', shown.text)
    assert secret is not None
    assert secret.group(1) not in (await web.get("/console/keys")).text  # once
    # The new key works for inference.
    params = cloud_pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
    )
    await platform.start_agent(ScriptedRuntime())
    await platform.ledger.TopUp(
        ledger_pb.TopUpRequest(
            account_id=customer.account_id, amount_micro_credits=10**6, idempotency_key="t"
        ),
        metadata=platform.service,
    )
    await platform.inference.CreateChatCompletion(
        cloud_pb.CreateChatCompletionRequest(params=params),
        metadata=(("authorization", f"Bearer {secret.group(1)}"),),
    )
    key_id = re.search(r'action="/console/keys/([0-9a-f-]+)/revoke"', shown.text)
    assert key_id is not None
    revoked = await web.post(
        f"/console/keys/{key_id.group(1)}/revoke", data={"csrf": token}, headers={"origin": BASE}
    )
    assert revoked.status_code == 303
    assert ">revoked<" in (await web.get("/console/keys")).text


async def test_an_operator_sees_its_nodes_and_only_admins_see_the_platform(
    platform: Platform, web: httpx.AsyncClient
) -> None:
    operator, node_token = await platform.operator()
    await platform.start_agent(ScriptedRuntime(), "ada-laptop", node_token, region="eu-west")
    await platform.start_agent(ScriptedRuntime(), "someone-else")
    await _sign_in(web, await _key(platform, operator, keys_pb.API_KEY_SCOPE_MANAGEMENT))
    nodes = await web.get("/console/nodes")
    assert nodes.status_code == 200
    assert 'data-node="ada-laptop"' in nodes.text
    assert "eu-west" in nodes.text
    assert "someone-else" not in nodes.text
    assert (await web.get("/console/admin")).status_code == 403

    await web.post("/console/sign-out", data={"csrf": _csrf(nodes)}, headers={"origin": BASE})
    assert (await web.get("/console/nodes")).status_code == 303
    await _sign_in(web, await _key(platform, operator, keys_pb.API_KEY_SCOPE_ADMIN))
    admin = await web.get("/console/admin")
    assert admin.status_code == 200
    assert 'data-node="ada-laptop"' in admin.text
    assert 'data-node="someone-else"' in admin.text
    assert 'data-testid="node-count">2<' in admin.text
    assert "balanced" in admin.text


async def test_a_revoked_key_ends_its_session(platform: Platform, web: httpx.AsyncClient) -> None:
    customer = await platform.customer(credits=0)
    key = await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    await _sign_in(web, key)
    listed = await keys_grpc.ApiKeyServiceStub(platform.channel).ListApiKeys(
        keys_pb.ListApiKeysRequest(account_id=customer.account_id), metadata=platform.service
    )
    for api_key in listed.api_keys:
        await keys_grpc.ApiKeyServiceStub(platform.channel).RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(api_key_id=api_key.api_key_id), metadata=platform.service
        )
    gone = await web.get("/console/usage")
    assert gone.headers["location"] == "/console/sign-in"
    assert (await web.get("/console/usage")).headers["location"] == "/console/sign-in"


async def test_recent_requests_are_jobs_and_admins_see_the_live_ones(
    platform: Platform, web: httpx.AsyncClient
) -> None:
    # A long, paced script: the streamed job below is still running when the admin looks.
    await platform.start_agent(
        ScriptedRuntime(script=" ".join(["word"] * 400), token_delay_s=0.05), "ada-laptop"
    )
    customer = await platform.customer(credits=10**6)
    params = cloud_pb.ChatCompletionParams(
        model=SMOLLM2_135M.id,
        messages=[common_pb.ChatMessage(role=common_pb.CHAT_ROLE_USER, content="hi")],
        max_tokens=3,
    )
    await platform.inference.CreateChatCompletion(
        cloud_pb.CreateChatCompletionRequest(params=params), metadata=customer.metadata
    )
    await _sign_in(web, await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT))
    usage = await until(lambda: web.get("/console/usage"), lambda page: "data-job=" in page.text)
    row = re.search(r"<tr data-job=.*?</tr>", usage.text, re.DOTALL)
    assert row is not None
    for shown in (SMOLLM2_135M.id, "finished", " + 3<"):
        assert shown in row.group(0)

    params.max_tokens = 400
    stream = platform.inference.StreamChatCompletion(
        cloud_pb.StreamChatCompletionRequest(params=params), metadata=customer.metadata
    )
    async for message in stream:
        if message.choices and message.choices[0].content:
            break  # the job is running on the node
    await _sign_in(web, await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_ADMIN))
    admin = await web.get("/console/admin")
    live = re.search(r'data-testid="live-jobs">.*?</table>', admin.text, re.DOTALL)
    assert live is not None
    assert "ada-laptop" in live.group(0)  # the node, by name
    assert customer.account_id[:8] in live.group(0)
    stream.cancel()


class _DownSessions:
    """A shared session store that does not answer (Redis down)."""

    async def get(self, handle: str) -> SealedSession | None:
        raise SessionsUnavailable("connection refused")

    async def put(self, handle: str, sealed: SealedSession, ttl_s: float) -> None:
        raise SessionsUnavailable("connection refused")

    async def delete(self, handle: str) -> None:
        raise SessionsUnavailable("connection refused")

    async def close(self) -> None:
        pass


async def test_a_session_store_that_does_not_answer_is_a_page_saying_so(
    platform: Platform,
) -> None:
    targets = ConsoleTargets(platform.target, platform.target, platform.target)
    app = create_app(
        platform.target, console=targets, console_sessions=SessionStore(_DownSessions())
    )
    customer = await platform.customer(credits=0)
    key = await _key(platform, customer.account_id, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=BASE,
            # A well-formed session id: looking it up needs the store.
            cookies={"resultity_console": "x" * 43},
        ) as web,
    ):
        for response in (
            await web.get("/console"),
            await web.get("/console/usage"),
            await _sign_in(web, key),
        ):
            assert response.status_code == 503
            assert "unavailable for a moment" in response.text
