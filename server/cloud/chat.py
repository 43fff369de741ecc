"""Chat completions: admission, dispatch, and exact settlement.

The worst-case cost is held before the job starts; whatever happens after
(completion, failure, client gone) the hold is settled for the tokens the
caller actually received, and settlement is shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from server.cloud.auth import CachedAuthenticator
from server.cloud.ports import AccountPort, Caller, HoldRef, NetworkPort, OperatorLine
from server.cloud.pricing import (
    TokenBudget,
    cost,
    prompt_token_bound,
    text_token_bound,
    token_budget,
    worst_case_cost,
)
from server.cloud.rate_limits import RateLimiter, RateLimitSettings, RateStatus
from server.cloud.settlement import operator_lines
from server.common.errors import InvalidArgument, JobFailed, ModelNotFound, NoCapacity
from server.common.inference import (
    CatalogModel,
    ChatMessage,
    FinishReason,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobMigrated,
    NodeUsage,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TokenLogprob,
    Usage,
)

log = structlog.get_logger(__name__)

MAX_STOP_SEQUENCES = 4
# Choices run one after another (each its own job), so n bounds the request's time.
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
# Inputs of one embeddings request; each is a job of its own.
MAX_EMBEDDING_INPUTS = 64


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
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


@dataclass(frozen=True, slots=True)
class TextRequest:
    """A text completion: raw prompts, no chat template."""

    model: str
    prompts: tuple[str, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str = ""
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    user: str = ""


@dataclass(frozen=True, slots=True)
class Embeddings:
    model: str
    # One vector per input, in order.
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
    charged: int
    rate_limits: RateStatus | None = None


@dataclass(frozen=True, slots=True)
class CompletionStarted:
    completion_id: str
    model: str
    created: datetime
    # The caller's rate limits after this request was admitted.
    rate_limits: RateStatus | None = None


@dataclass(frozen=True, slots=True)
class ChoiceStarted:
    index: int


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    # An embedding job's vector.
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class CompletionFinished:
    usage: Usage
    charged: int
    # Time the nodes spent on the jobs as cloud saw it: from each job's assignment
    # to its end, summed over the choices.
    generation_s: float = 0.0


CompletionEvent = (
    CompletionStarted | ChoiceStarted | ContentDelta | ChoiceFinished | CompletionFinished
)


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    content: str
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    started: CompletionStarted
    choices: tuple[Choice, ...]
    finished: CompletionFinished


def _check_range(value: float | None, low: float, high: float, field: str) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low:g} and {high:g}", field=field)


def _validate_response_format(response_format: ResponseFormat | None) -> None:
    if response_format is None or response_format.type != ResponseFormatType.JSON_SCHEMA:
        return
    try:
        schema = json.loads(response_format.json_schema)
    except ValueError:
        schema = None
    if not isinstance(schema, dict):
        raise InvalidArgument(
            "response_format.json_schema.schema must be a JSON object",
            field="response_format.json_schema.schema",
        )


def validate(request: ChatRequest | TextRequest | EmbeddingRequest) -> None:
    if not request.model:
        raise InvalidArgument("model is required", field="model")
    if isinstance(request, EmbeddingRequest):
        if not request.inputs:
            raise InvalidArgument("input must contain at least one text", field="input")
        if not all(request.inputs):
            raise InvalidArgument("input texts must not be empty", field="input")
        if len(request.inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidArgument(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request", field="input"
            )
        return
    if isinstance(request, ChatRequest):
        if not request.messages:
            raise InvalidArgument("messages must contain at least one message", field="messages")
        _validate_response_format(request.response_format)
    else:
        if not request.prompts:
            raise InvalidArgument("prompt must contain at least one prompt", field="prompt")
        if not all(request.prompts):
            raise InvalidArgument("prompts must not be empty", field="prompt")
        if len(request.prompts) * request.n > MAX_CHOICES:
            raise InvalidArgument(
                f"at most {MAX_CHOICES} choices (prompts times n) per request", field="n"
            )
    if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
        raise InvalidArgument("temperature must be between 0 and 2", field="temperature")
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]", field="top_p")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("at most 4 stop sequences are allowed", field="stop")
    if any(not sequence for sequence in request.stop):
        raise InvalidArgument("stop sequences must not be empty", field="stop")
    if not 1 <= request.n <= MAX_CHOICES:
        raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}", field="n")
    _check_range(request.presence_penalty, -2.0, 2.0, "presence_penalty")
    _check_range(request.frequency_penalty, -2.0, 2.0, "frequency_penalty")
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise InvalidArgument("top_logprobs requires logprobs to be true", field="top_logprobs")
        _check_range(request.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")


def _sampling(request: ChatRequest | TextRequest, max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
        response_format=request.response_format if isinstance(request, ChatRequest) else None,
    )


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
        rate_limits: RateLimitSettings | None = None,
    ) -> None:
        self.limiter = RateLimiter(rate_limits)
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
        return await _collect(self.stream(authorization, request, request_id))

    async def get_model(self, authorization: str | None, model_id: str) -> CatalogModel:
        """A model the caller may use and some ready node serves; else ModelNotFound."""
        for model in await self.list_models(authorization):
            if model.id == model_id:
                return model
        raise ModelNotFound(model_id)

    async def stream(
        self, authorization: str | None, request: ChatRequest, request_id: str
    ) -> AsyncGenerator[CompletionEvent, None]:
        """One CompletionStarted; per choice (one after another) a ChoiceStarted, its
        ContentDeltas and a ChoiceFinished; then one CompletionFinished."""
        caller, model = await self._admit(authorization, request)
        budget = token_budget(
            prompt_token_bound(request.messages, model), request.max_tokens, model
        )
        spec = GenerationSpec(
            model=model.id,
            messages=request.messages,
            sampling=_sampling(request, budget.max_completion_tokens),
            max_prompt_tokens=budget.max_prompt_tokens,
        )
        jobs = [(spec, budget)] * request.n
        async for event in self._run(caller, model, jobs, "chatcmpl", request_id):
            yield event

    async def stream_text(
        self, authorization: str | None, request: TextRequest, request_id: str
    ) -> AsyncGenerator[CompletionEvent, None]:
        """As ``stream``, for raw prompts: choice i*n+j is prompt i's j-th."""
        caller, model = await self._admit(authorization, request)
        jobs = []
        for prompt in request.prompts:
            budget = token_budget(text_token_bound(prompt, model), request.max_tokens, model)
            spec = GenerationSpec(
                model=model.id,
                messages=(),
                sampling=_sampling(request, budget.max_completion_tokens),
                max_prompt_tokens=budget.max_prompt_tokens,
                prompt=prompt,
            )
            jobs.extend([(spec, budget)] * request.n)
        async for event in self._run(caller, model, jobs, "cmpl", request_id):
            yield event

    async def complete_text(
        self, authorization: str | None, request: TextRequest, request_id: str
    ) -> ChatCompletion:
        return await _collect(self.stream_text(authorization, request, request_id))

    async def embed(
        self, authorization: str | None, request: EmbeddingRequest, request_id: str
    ) -> Embeddings:
        """Embeds each input as its own job (one after another); bills prompt tokens."""
        caller, model = await self._admit(authorization, request)
        jobs = []
        for text in request.inputs:
            bound = min(text_token_bound(text, model), model.context_length)
            spec = GenerationSpec(
                model=model.id,
                messages=(),
                sampling=Sampling(max_tokens=0),
                max_prompt_tokens=bound,
                prompt=text,
                embed=True,
            )
            jobs.append((spec, TokenBudget(max_prompt_tokens=bound, max_completion_tokens=0)))
        vectors: dict[int, tuple[float, ...]] = {}
        rate_limits: RateStatus | None = None
        async with contextlib.aclosing(
            self._run(caller, model, jobs, "embd", request_id)
        ) as events:
            async for event in events:
                if isinstance(event, CompletionStarted):
                    rate_limits = event.rate_limits
                elif isinstance(event, ContentDelta) and event.embedding:
                    vectors[event.index] = event.embedding
                elif isinstance(event, CompletionFinished):
                    if len(vectors) != len(jobs):
                        raise JobFailed("a node returned no embedding")
                    return Embeddings(
                        model.id,
                        tuple(vectors[index] for index in range(len(jobs))),
                        event.usage,
                        event.charged,
                        rate_limits,
                    )
        raise AssertionError("embedding jobs ended without finishing")

    async def _admit(
        self, authorization: str | None, request: ChatRequest | TextRequest | EmbeddingRequest
    ) -> tuple[Caller, CatalogModel]:
        caller = await self.authenticator.authenticate(authorization)
        caller.require_inference()
        validate(request)
        caller.require_model(request.model)
        model = await self.models.get(request.model)
        if model.ready_nodes == 0:
            raise NoCapacity(f"no node is serving the model '{model.id}' right now")
        return caller, model

    async def _run(
        self,
        caller: Caller,
        model: CatalogModel,
        jobs: list[tuple[GenerationSpec, TokenBudget]],
        id_prefix: str,
        request_id: str,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Admits the request under the caller's rate limits, holds the worst case of
        all ``jobs``, runs them one after another (one choice each) and settles what
        was delivered, however the stream ends."""
        job_ids = [uuid.uuid4().hex for _ in jobs]
        bound = log.bind(request_id=request_id, job_id=job_ids[0], account_id=caller.account_id)
        # Tokens per minute are reserved for the worst case, like the hold, and
        # corrected to what was delivered when the request ends.
        admission = self.limiter.admit(
            caller.api_key_id,
            caller.account_id,
            sum(budget.max_prompt_tokens + budget.max_completion_tokens for _, budget in jobs),
        )
        # Usage of the finished choices, and of the one running.
        finished = Usage()
        delivered = Usage()
        # What each node delivered for the choices that finished, for its operator.
        shares: list[NodeUsage] = []
        generation_s = 0.0
        try:
            hold = await self._account.create_hold(
                caller.account_id,
                sum(worst_case_cost(model.price, budget) for _, budget in jobs),
                idempotency_key=f"chat:{job_ids[0]}",
                expires=datetime.now(UTC) + self._hold_ttl,
            )
            settled = False
            try:
                for index, (job_id, (spec, _)) in enumerate(zip(job_ids, jobs, strict=True)):
                    delivered = Usage()
                    job = bound.bind(job_id=job_id, choice=index)
                    events = self._network.run_job(job_id, spec)
                    assigned_at: float | None = None
                    try:
                        async for event in events:
                            if isinstance(event, JobAssigned):
                                job.info("job started", node_id=event.node_id)
                                assigned_at = time.monotonic()
                                if index == 0:
                                    yield CompletionStarted(
                                        f"{id_prefix}-{job_id}",
                                        model.id,
                                        datetime.now(UTC),
                                        admission.status,
                                    )
                                yield ChoiceStarted(index)
                            elif isinstance(event, JobDelta):
                                delivered = Usage(
                                    event.prompt_tokens or delivered.prompt_tokens,
                                    delivered.completion_tokens + event.token_count,
                                )
                                yield ContentDelta(
                                    event.text, index, event.logprobs, event.embedding
                                )
                            elif isinstance(event, JobMigrated):
                                job.info("job continues on another node", node_id=event.node_id)
                            else:
                                # Bill what the caller received; the node's prompt count is
                                # final.
                                delivered = Usage(
                                    event.usage.prompt_tokens or delivered.prompt_tokens,
                                    delivered.completion_tokens,
                                )
                                shares.extend(event.node_usage)
                                if assigned_at is not None:
                                    generation_s += time.monotonic() - assigned_at
                                yield ChoiceFinished(index, event.finish_reason)
                                break
                    finally:
                        await events.aclose()
                    finished = _add(finished, delivered)
                    delivered = Usage()
                settled = True
                charged = await self._settle(
                    hold, cost(model.price, finished), bound, operator_lines(model.id, shares)
                )
                yield CompletionFinished(finished, charged, generation_s)
            finally:
                if not settled:
                    # Cut short: no node reported a signed usage for the last choice, so
                    # operators are not credited and the platform keeps the capture.
                    usage = _add(finished, delivered)
                    await self._settle(hold, cost(model.price, usage), bound)
        finally:
            admission.release(_add(finished, delivered).total_tokens)

    async def _settle(
        self,
        hold: HoldRef,
        amount: int,
        bound: structlog.typing.FilteringBoundLogger,
        lines: tuple[OperatorLine, ...] = (),
    ) -> int:
        capture = min(amount, hold.amount)
        if capture < amount:
            bound.error("usage exceeded the hold; charging the hold", cost=amount, hold=hold.amount)
        # A task outlives our cancellation: the hold is settled even if the client left.
        task = asyncio.create_task(self._account.settle_hold(hold.hold_id, capture, lines))
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)
        charged = await asyncio.shield(task)
        bound.info("settled", charged=charged, held=hold.amount)
        return charged

    async def drain(self) -> None:
        """Waits for settlements in flight (used at shutdown)."""
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens)


async def _collect(events: AsyncGenerator[CompletionEvent, None]) -> ChatCompletion:
    """A whole completion from its stream of events."""
    started: CompletionStarted | None = None
    parts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    choices: list[Choice] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, CompletionStarted):
                started = event
            elif isinstance(event, ChoiceStarted):
                parts[event.index], logprobs[event.index] = [], []
            elif isinstance(event, ContentDelta):
                parts[event.index].append(event.text)
                logprobs[event.index].extend(event.logprobs)
            elif isinstance(event, ChoiceFinished):
                text = "".join(parts[event.index])
                choice_logprobs = tuple(logprobs[event.index])
                choices.append(Choice(event.index, text, event.finish_reason, choice_logprobs))
            else:
                assert started is not None  # a stream always starts first
                return ChatCompletion(started, tuple(choices), event)
    raise AssertionError("completion stream ended without finishing")
