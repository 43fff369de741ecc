"""Chat completions: admission, dispatch, and exact settlement.

The worst-case cost is held before the job starts; whatever happens after
(completion, failure, client gone) the hold is settled for the tokens the
caller actually received, and settlement is shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from server.cloud.auth import CachedAuthenticator
from server.cloud.ports import AccountPort, HoldRef, NetworkPort
from server.cloud.pricing import cost, token_budget, worst_case_cost
from server.common.errors import InvalidArgument, ModelNotFound, NoCapacity
from server.common.inference import (
    CatalogModel,
    ChatMessage,
    FinishReason,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobMigrated,
    Sampling,
    Usage,
)

log = structlog.get_logger(__name__)

MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str = ""


@dataclass(frozen=True, slots=True)
class CompletionStarted:
    completion_id: str
    model: str
    created: datetime


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CompletionFinished:
    finish_reason: FinishReason
    usage: Usage
    charged: int


CompletionEvent = CompletionStarted | ContentDelta | CompletionFinished


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    started: CompletionStarted
    content: str
    finished: CompletionFinished


def validate(request: ChatRequest) -> None:
    if not request.model:
        raise InvalidArgument("model is required", field="model")
    if not request.messages:
        raise InvalidArgument("messages must contain at least one message", field="messages")
    if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
        raise InvalidArgument("temperature must be between 0 and 2", field="temperature")
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]", field="top_p")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("at most 4 stop sequences are allowed", field="stop")
    if any(not sequence for sequence in request.stop):
        raise InvalidArgument("stop sequences must not be empty", field="stop")


class ModelDirectory:
    """The network's catalog, refreshed at most every ``ttl_s`` seconds."""

    def __init__(self, network: NetworkPort, *, ttl_s: float = 2.0) -> None:
        self._network = network
        self._ttl_s = ttl_s
        self._models: dict[str, CatalogModel] = {}
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def all(self) -> list[CatalogModel]:
        if time.monotonic() >= self._expires:
            async with self._lock:
                if time.monotonic() >= self._expires:
                    models = await self._network.list_models()
                    self._models = {model.id: model for model in models}
                    self._expires = time.monotonic() + self._ttl_s
        return list(self._models.values())

    async def get(self, model_id: str) -> CatalogModel:
        for model in await self.all():
            if model.id == model_id:
                return model
        raise ModelNotFound(model_id)


class ChatService:
    def __init__(
        self,
        account: AccountPort,
        network: NetworkPort,
        *,
        auth_ttl_s: float = 5.0,
        catalog_ttl_s: float = 2.0,
        hold_ttl: timedelta = timedelta(hours=1),
    ) -> None:
        self._account = account
        self._network = network
        self.authenticator = CachedAuthenticator(account, ttl_s=auth_ttl_s)
        self.models = ModelDirectory(network, ttl_s=catalog_ttl_s)
        self._hold_ttl = hold_ttl
        self._settlements: set[asyncio.Task[int]] = set()

    async def list_models(self, authorization: str | None) -> list[CatalogModel]:
        caller = await self.authenticator.authenticate(authorization)
        caller.require_inference()
        return [
            model
            for model in await self.models.all()
            if model.ready_nodes > 0
            and (not caller.allowed_models or model.id in caller.allowed_models)
        ]

    async def complete(
        self, authorization: str | None, request: ChatRequest, request_id: str
    ) -> ChatCompletion:
        started: CompletionStarted | None = None
        parts: list[str] = []
        async for event in self.stream(authorization, request, request_id):
            if isinstance(event, CompletionStarted):
                started = event
            elif isinstance(event, ContentDelta):
                parts.append(event.text)
            else:
                assert started is not None  # stream() always starts first
                return ChatCompletion(started, "".join(parts), event)
        raise AssertionError("completion stream ended without finishing")

    async def stream(
        self, authorization: str | None, request: ChatRequest, request_id: str
    ) -> AsyncGenerator[CompletionEvent, None]:
        caller = await self.authenticator.authenticate(authorization)
        caller.require_inference()
        validate(request)
        caller.require_model(request.model)
        model = await self.models.get(request.model)
        if model.ready_nodes == 0:
            raise NoCapacity(f"no node is serving the model '{model.id}' right now")
        budget = token_budget(request.messages, request.max_tokens, model)
        job_id = uuid.uuid4().hex
        bound = log.bind(request_id=request_id, job_id=job_id, account_id=caller.account_id)
        hold = await self._account.create_hold(
            caller.account_id,
            worst_case_cost(model.price, budget),
            idempotency_key=f"chat:{job_id}",
            expires=datetime.now(UTC) + self._hold_ttl,
        )
        spec = GenerationSpec(
            model=model.id,
            messages=request.messages,
            sampling=Sampling(
                max_tokens=budget.max_completion_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stop,
                seed=request.seed,
            ),
            max_prompt_tokens=budget.max_prompt_tokens,
        )
        delivered = Usage()
        settled = False
        events = self._network.run_job(job_id, spec)
        try:
            async for event in events:
                if isinstance(event, JobAssigned):
                    bound.info("job started", node_id=event.node_id)
                    yield CompletionStarted(f"chatcmpl-{job_id}", model.id, datetime.now(UTC))
                elif isinstance(event, JobDelta):
                    delivered = Usage(
                        event.prompt_tokens or delivered.prompt_tokens,
                        delivered.completion_tokens + event.token_count,
                    )
                    yield ContentDelta(event.text)
                elif isinstance(event, JobMigrated):
                    bound.info("job continues on another node", node_id=event.node_id)
                else:
                    # Bill what the caller received; the node's prompt count is final.
                    usage = Usage(
                        event.usage.prompt_tokens or delivered.prompt_tokens,
                        delivered.completion_tokens,
                    )
                    settled = True
                    charged = await self._settle(hold, cost(model.price, usage), bound)
                    yield CompletionFinished(event.finish_reason, usage, charged)
                    return
        finally:
            await events.aclose()
            if not settled:
                await self._settle(hold, cost(model.price, delivered), bound)

    async def _settle(
        self,
        hold: HoldRef,
        amount: int,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> int:
        capture = min(amount, hold.amount)
        if capture < amount:
            bound.error("usage exceeded the hold; charging the hold", cost=amount, hold=hold.amount)
        # A task outlives our cancellation: the hold is settled even if the client left.
        task = asyncio.create_task(self._account.settle_hold(hold.hold_id, capture))
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)
        charged = await asyncio.shield(task)
        bound.info("settled", charged=charged, held=hold.amount)
        return charged

    async def drain(self) -> None:
        """Waits for settlements in flight (used at shutdown)."""
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)
