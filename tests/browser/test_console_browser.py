"""The web console in a real headless Chromium (Debian's, driven by Playwright), on
the platform as users start it: sign in with the demo key, watch the balance drop
after a request, create and revoke a key, see the local node as its operator and as
an admin. Screenshots go to $RESULTITY_SCREENSHOTS (default .ci/artifacts/console),
which CI keeps. Marked `browser`: `make test` needs no browser (`make test-browser`)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc

from tests.running_platform import MODEL, RunningPlatform

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("RESULTITY_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("RESULTITY_SCREENSHOTS", ".ci/artifacts/console"))
# Waits for what the platform does in the background (htmx refresh, relay); they
# bound a broken test only.
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def chromium() -> str:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    yield page
    await context.close()


def _console(platform: RunningPlatform) -> str:
    return platform.base_url.removesuffix("/v1") + "/console"


async def _sign_in(page: Page, platform: RunningPlatform, key: str, shot: str = "") -> None:
    await page.goto(_console(platform))
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.get_by_label("API key").fill(key)
    if shot:
        await page.screenshot(path=SHOTS / shot)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Usage")).to_be_visible()


async def _new_key(platform: RunningPlatform, account_id: str, scope: int) -> str:
    async with grpc.aio.insecure_channel(platform.grpc_target) as channel:
        issued = await keys_grpc.ApiKeyServiceStub(channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(account_id=account_id, name="browser", scopes=[scope]),
            metadata=(("authorization", f"Bearer {platform.service_token}"),),
        )
    return issued.secret


async def _account_of(platform: RunningPlatform, key: str) -> str:
    async with grpc.aio.insecure_channel(platform.grpc_target) as channel:
        found = await keys_grpc.ApiKeyServiceStub(channel).AuthenticateApiKey(
            keys_pb.AuthenticateApiKeyRequest(secret=key),
            metadata=(("authorization", f"Bearer {platform.service_token}"),),
        )
    return found.api_key.account_id


async def test_a_consumer_watches_the_balance_drop_and_manages_keys(
    platform: RunningPlatform, page: Page
) -> None:
    await _sign_in(page, platform, platform.api_key, "01-sign-in.png")
    available = page.get_by_test_id("available")
    before = await available.inner_text()
    await platform.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    # The balance panel refreshes itself (htmx), without reloading the page.
    await expect(available).not_to_have_text(before, timeout=WAIT_MS)
    after = await available.inner_text()
    assert float(after.replace(",", "")) < float(before.replace(",", ""))
    # The request is listed, as the job that ran it, once its record is written.
    await _until_listed(page)
    recent = page.get_by_test_id("recent-requests").locator("tbody tr").first
    await expect(recent).to_contain_text(MODEL)
    await expect(recent).to_contain_text("finished")
    await expect(page.locator("svg.chart rect.bar")).to_have_count(24)
    await page.screenshot(path=SHOTS / "02-usage.png", full_page=True)

    await page.get_by_role("link", name="API keys").click()
    await page.get_by_label("Name").fill("browser-test")
    await page.get_by_label("management").check()
    await page.get_by_role("button", name="Create key").click()
    secret = await page.get_by_test_id("new-secret").inner_text()
    assert re.fullmatch(r"rsk_\S+", secret)
    row = page.locator("tr", has_text="browser-test")
    await expect(row).to_contain_text("inference, management")
    await expect(row).to_contain_text("active")
    await page.screenshot(path=SHOTS / "03-key-created.png", full_page=True)
    await row.get_by_role("button", name="Revoke").click()
    await expect(page.locator("tr", has_text="browser-test")).to_contain_text("revoked")
    await expect(page.get_by_test_id("new-secret")).to_have_count(0)
    await page.screenshot(path=SHOTS / "04-key-revoked.png", full_page=True)
    # The revoked key no longer signs in.
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_label("API key").fill(secret)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_contain_text("unknown, revoked or expired")


async def test_the_operator_and_an_admin_see_the_local_node(
    platform: RunningPlatform, page: Page
) -> None:
    node_token = (platform.data_dir / "node-token").read_text().strip()
    operator = await _account_of(platform, node_token)
    await _sign_in(
        page, platform, await _new_key(platform, operator, keys_pb.API_KEY_SCOPE_MANAGEMENT)
    )
    await page.get_by_role("link", name="Nodes & earnings").click()
    local = page.locator('tr[data-node="local"]')
    await expect(local).to_contain_text("ready")
    await expect(local).to_contain_text(MODEL)
    await expect(page.locator("svg.chart")).to_be_visible()
    await page.screenshot(path=SHOTS / "05-operator-nodes.png", full_page=True)
    await expect(page.get_by_role("link", name="Admin")).to_have_count(0)

    await page.get_by_role("button", name="Sign out").click()
    demo = await _account_of(platform, platform.api_key)
    await _sign_in(page, platform, await _new_key(platform, demo, keys_pb.API_KEY_SCOPE_ADMIN))
    await page.get_by_role("link", name="Admin").click()
    await expect(page.get_by_test_id("node-count")).to_have_text("1")
    await expect(page.locator('tr[data-node="local"]')).to_contain_text("ready")
    await expect(page.get_by_text("balanced", exact=True)).to_be_visible()
    await page.screenshot(path=SHOTS / "06-admin.png", full_page=True)

    # A request streaming now is a live job, on the local node.
    stream = await platform.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        max_tokens=400,
        stream=True,
    )
    try:
        await anext(aiter(stream))
        await page.reload()
        live = page.get_by_test_id("live-jobs").locator("tbody tr")
        await expect(live).to_have_count(1)
        await expect(live).to_contain_text("local")
        await expect(live).to_contain_text(MODEL)
        await page.screenshot(path=SHOTS / "07-live-jobs.png", full_page=True)
    finally:
        await stream.close()


async def _until_listed(page: Page) -> None:
    """Reloads until the page lists a request (job records are written behind it)."""
    for _ in range(WAIT_MS // 500):
        await page.reload()
        if await page.locator("table tbody tr").count():
            return
        await page.wait_for_timeout(500)
    raise AssertionError("the request was never listed")
