"""The whole platform behind a real gateway, for tests that speak OpenAI's HTTP API
with real clients (the `openai` SDK, httpx, LangChain)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc

from gateway.app import create_app
from gateway.server import serve
from tests.harness import Customer, Platform, free_port

CREDITS = 100_000_000


@dataclass
class Stack:
    platform: Platform
    base_url: str
    customer: Customer

    def client(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        """The official client with strict response validation and no retries."""
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or self.customer.api_key,
            max_retries=0,
            _strict_response_validation=True,
        )

    def http(self, api_key: str | None = None) -> httpx.AsyncClient:
        key = api_key or self.customer.api_key
        return httpx.AsyncClient(
            base_url=self.base_url, headers={"authorization": f"Bearer {key}"}, timeout=30
        )

    async def key(self, **fields: Any) -> str:
        response = await keys_grpc.ApiKeyServiceStub(self.platform.channel).CreateApiKey(
            keys_pb.CreateApiKeyRequest(
                account_id=self.customer.account_id, name="conformance", **fields
            ),
            metadata=self.platform.service,
        )
        return response.secret


@contextlib.asynccontextmanager
async def gateway_stack(platform: Platform, credits: int = CREDITS) -> AsyncIterator[Stack]:
    """A gateway in front of ``platform`` on a free port, and a customer with credits."""
    port = free_port()
    started = asyncio.Event()
    gateway = asyncio.create_task(
        serve(create_app(platform.target), "127.0.0.1", port, started=started)
    )
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait((gateway, waiter), return_when=asyncio.FIRST_COMPLETED)
    if gateway.done():
        gateway.result()
    try:
        yield Stack(platform, f"http://127.0.0.1:{port}", await platform.customer(credits))
    finally:
        gateway.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gateway
