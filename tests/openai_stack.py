"""The whole platform behind a real gateway, for tests that speak OpenAI's HTTP API
with real clients (the `openai` SDK, httpx, LangChain)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc

from tests.harness import Customer, Platform, serving_gateway

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
    async with serving_gateway(platform.target) as base_url:
        yield Stack(platform, base_url, await platform.customer(credits))
