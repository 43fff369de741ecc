"""What the cloud layer needs from the account and network layers."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.common.inference import CatalogModel, GenerationSpec, JobEvent


@dataclass(frozen=True, slots=True)
class Caller:
    account_id: str
    api_key_id: str


@dataclass(frozen=True, slots=True)
class HoldRef:
    hold_id: str
    amount: int


class AccountPort(Protocol):
    async def authenticate(self, secret: str) -> Caller: ...

    async def create_hold(
        self, account_id: str, amount: int, *, idempotency_key: str, expires: datetime
    ) -> HoldRef: ...

    async def settle_hold(self, hold_id: str, capture: int) -> int:
        """Captures ``capture`` of the hold, releases the rest; returns the captured amount."""
        ...


class NetworkPort(Protocol):
    async def list_models(self) -> list[CatalogModel]: ...

    def run_job(self, job_id: str, spec: GenerationSpec) -> AsyncGenerator[JobEvent, None]: ...
