"""What the cloud layer needs from the account and network layers."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.common.errors import PermissionDenied
from server.common.inference import CatalogModel, GenerationSpec, JobEvent


@dataclass(frozen=True, slots=True)
class Caller:
    account_id: str
    api_key_id: str
    # What the key may do: the "inference" scope, and the models it may call
    # (empty: all).
    may_infer: bool = True
    allowed_models: frozenset[str] = frozenset()

    def require_inference(self) -> None:
        if not self.may_infer:
            raise PermissionDenied("This API key may not be used for inference")

    def require_model(self, model: str) -> None:
        if self.allowed_models and model not in self.allowed_models:
            raise PermissionDenied(f"This API key may not use the model '{model}'")


@dataclass(frozen=True, slots=True)
class HoldRef:
    hold_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class OperatorLine:
    """Tokens a node operator's nodes delivered for one request."""

    operator_account_id: str
    node_id: str
    model: str
    tokens: int


class AccountPort(Protocol):
    async def authenticate(self, secret: str) -> Caller: ...

    async def create_hold(
        self, account_id: str, amount: int, *, idempotency_key: str, expires: datetime
    ) -> HoldRef: ...

    async def settle_hold(
        self, hold_id: str, capture: int, lines: Sequence[OperatorLine] = ()
    ) -> int:
        """Captures ``capture`` of the hold, releases the rest, credits the operators of
        ``lines`` their share; returns the captured amount."""
        ...


class NetworkPort(Protocol):
    async def list_models(self) -> list[CatalogModel]: ...

    def run_job(self, job_id: str, spec: GenerationSpec) -> AsyncGenerator[JobEvent, None]: ...
