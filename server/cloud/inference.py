"""The contract's InferenceService: chat and text completions and embeddings, with
admission, dispatch and exact settlement.

The worst-case cost is held before the job starts; whatever happens after
(completion, failure, client gone) the hold is settled for the tokens the
caller actually received, and settlement is shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from core.errors import DomainError, InvalidApiKey, JobFailed, ModelNotFound, NoCapacity
from core.inference import (
    CatalogModel,
    GenerationSpec,
    JobAssigned,
    JobDelta,
    JobMigrated,
    JobOrigin,
    NodeRequirements,
    NodeUsage,
    Sampling,
    TokenLogprob,
    ToolCall,
    Usage,
)
from server.cloud.auth import CachedAuthenticator
from server.cloud.inference_logs import InferenceLogWriter, LogCapture
from server.cloud.inflight import InFlightLeases, InFlightRequest
from server.cloud.metrics import CANCELLED, COMPLETED, OPERATIONS, CloudMetrics
from server.cloud.models import ModelDirectory
from server.cloud.ports import AccountPort, Caller, HoldRef, NetworkPort, SettlementPort
from server.cloud.pricing import (
    TokenBudget,
    cost,
    prompt_token_bound,
    text_token_bound,
    token_budget,
    worst_case_cost,
)
from server.cloud.rate_limits import DefaultLimits, LimitCounters, RateLimiter, RateStatus
from server.cloud.requests import (
    FLUSH,
    ChatCompletion,
    ChatRequest,
    Choice,
    ChoiceFinished,
    ChoiceStarted,
    CompletionEvent,
    CompletionFinished,
    CompletionStarted,
    ContentDelta,
    EmbeddingRequest,
    Embeddings,
    Flush,
    GenerationRequest,
    TextRequest,
    ToolCallDelta,
    sampling_for,
    validate,
)
from server.cloud.settlement import operator_shares
from server.cloud.subcloud_service import SubcloudResolver
from server.cloud.subclouds import Subcloud, route_requirements
from server.cloud.tool_call_events import with_tool_calls
from server.common.inference_logging import log_retention
from server.common.settlements import Settlement

log = structlog.get_logger(__name__)


class InferenceService:
    def __init__(
        self,
        account: AccountPort,
        network: NetworkPort,
        *,
        settlements: SettlementPort,
        inflight: InFlightLeases,
        auth_ttl_s: float = 5.0,
        catalog_ttl_s: float = 2.0,
        hold_ttl: timedelta = timedelta(hours=1),
        rate_limits: DefaultLimits | None = None,
        subclouds: SubcloudResolver | None = None,
        rate_limit_counters: LimitCounters | None = None,
        metrics: CloudMetrics | None = None,
        logs: InferenceLogWriter | None = None,
    ) -> None:
        """``subclouds`` unset: keys bound to a subcloud are refused.
        ``rate_limit_counters`` unset: this replica's own. ``logs`` unset: no request
        is logged, whoever opted in."""
        self._metrics = metrics or CloudMetrics()
        self.limiter = RateLimiter(
            rate_limits,
            counters=rate_limit_counters,
            rejections=self._metrics.rate_limit_rejections,
        )
        self._subclouds = subclouds
        self._account = account
        self._network = network
        self._settler = settlements
        self._inflight = inflight
        self._logs = logs
        self.authenticator = CachedAuthenticator(account, ttl_s=auth_ttl_s)
        self.models = ModelDirectory(network, ttl_s=catalog_ttl_s)
        self._hold_ttl = hold_ttl
        # Settlements, and the forgetting of settled requests, in flight.
        self._settlements: set[asyncio.Task[Any]] = set()

    async def list_models(self, authorization: str | None) -> list[CatalogModel]:
        """The models the caller may use that some node meeting its rules serves, at the
        caller's prices."""
        caller = await self.authenticator.authenticate(authorization)
        caller.require_inference()
        subcloud = await self._subcloud(caller)
        listed = []
        for model in await self.models.all(route_requirements(subcloud, "")):
            offered = _offered(model, subcloud)
            if (
                offered is not None
                and offered.ready_nodes > 0
                and (not caller.allowed_models or model.id in caller.allowed_models)
            ):
                listed.append(offered)
        return listed

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
        self,
        authorization: str | None,
        request: ChatRequest,
        request_id: str,
        *,
        flushes: bool = False,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """One CompletionStarted; per choice (one after another) a ChoiceStarted, its
        ContentDeltas (and, with tools, ToolCallDeltas after them) and a
        ChoiceFinished; then one CompletionFinished. With ``flushes``, a Flush after
        each run of events that were ready together."""
        caller, model, rules, retention = await self._admit(authorization, request)
        tool_use = request.tool_use
        tools = tool_use.tools if tool_use is not None else ()
        budget = token_budget(
            prompt_token_bound(request.messages, model, tools), request.max_tokens, model
        )
        spec = GenerationSpec(
            model=model.id,
            messages=request.messages,
            sampling=sampling_for(request, budget.max_completion_tokens),
            max_prompt_tokens=budget.max_prompt_tokens,
            tool_use=tool_use,
        )
        jobs = [(spec, budget)] * request.n
        run = self._run(caller, model, rules, jobs, "chatcmpl", request_id)
        # Closed with this stream, not when collected: the hold is settled on close.
        async with contextlib.aclosing(
            self._logged(
                run if tool_use is None else with_tool_calls(run, tool_use),
                "chat.completions",
                request,
                caller,
                request_id,
                retention,
            )
        ) as events:
            async for event in events:
                if flushes or not isinstance(event, Flush):
                    yield event

    async def stream_text(
        self,
        authorization: str | None,
        request: TextRequest,
        request_id: str,
        *,
        flushes: bool = False,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """As ``stream``, for raw prompts: choice i*n+j is prompt i's j-th."""
        caller, model, rules, retention = await self._admit(authorization, request)
        jobs = []
        for prompt in request.prompts:
            budget = token_budget(text_token_bound(prompt, model), request.max_tokens, model)
            spec = GenerationSpec(
                model=model.id,
                messages=(),
                sampling=sampling_for(request, budget.max_completion_tokens),
                max_prompt_tokens=budget.max_prompt_tokens,
                prompt=prompt,
            )
            jobs.extend([(spec, budget)] * request.n)
        run = self._run(caller, model, rules, jobs, "cmpl", request_id)
        # Closed with this stream, not when collected: the hold is settled on close.
        async with contextlib.aclosing(
            self._logged(run, "completions", request, caller, request_id, retention)
        ) as events:
            async for event in events:
                if flushes or not isinstance(event, Flush):
                    yield event

    async def complete_text(
        self, authorization: str | None, request: TextRequest, request_id: str
    ) -> ChatCompletion:
        return await _collect(self.stream_text(authorization, request, request_id))

    async def embed(
        self, authorization: str | None, request: EmbeddingRequest, request_id: str
    ) -> Embeddings:
        """Embeds each input as its own job (one after another); bills prompt tokens."""
        caller, model, rules, retention = await self._admit(authorization, request)
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
        run = self._run(caller, model, rules, jobs, "embd", request_id)
        async with contextlib.aclosing(
            self._logged(run, "embeddings", request, caller, request_id, retention)
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
        self, authorization: str | None, request: GenerationRequest | EmbeddingRequest
    ) -> tuple[Caller, CatalogModel, NodeRequirements, timedelta | None]:
        """The caller, the model at the caller's price, the nodes that may run it, and
        how long the request's log is kept (None: not logged)."""
        caller = await self.authenticator.authenticate(authorization)
        caller.require_inference()
        validate(request)
        caller.require_model(request.model)
        subcloud = await self._subcloud(caller)
        rules = route_requirements(subcloud, request.region)
        model = _offered(await self.models.get(request.model, rules), subcloud)
        if model is None:
            raise ModelNotFound(request.model)
        if model.ready_nodes == 0:
            raise NoCapacity(f"no node is serving the model '{model.id}' right now")
        retention = log_retention(
            caller.inference_logging, None if subcloud is None else subcloud.inference_logging
        )
        return caller, model, rules, retention

    def _logged(
        self,
        events: AsyncGenerator[CompletionEvent, None],
        endpoint: str,
        request: GenerationRequest | EmbeddingRequest,
        caller: Caller,
        request_id: str,
        retention: timedelta | None,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """``events``, and the request's log written behind them when it is kept."""
        if retention is None or self._logs is None:
            return events
        capture = LogCapture(
            endpoint,
            request,
            request_id=request_id,
            account_id=caller.account_id,
            subcloud_id=caller.subcloud_id,
            retention=retention,
        )
        return self._logs.recorded(events, capture)

    async def _subcloud(self, caller: Caller) -> Subcloud | None:
        if self._subclouds is None:
            if caller.subcloud_id:
                raise InvalidApiKey("This server does not serve subcloud keys")
            return None
        return await self._subclouds.for_caller(caller)

    async def _run(
        self,
        caller: Caller,
        model: CatalogModel,
        rules: NodeRequirements,
        jobs: list[tuple[GenerationSpec, TokenBudget]],
        id_prefix: str,
        request_id: str,
    ) -> AsyncGenerator[CompletionEvent, None]:
        """Admits the request under the caller's rate limits, holds the worst case of
        all ``jobs``, runs them one after another (one choice each) and settles what
        was delivered, however the stream ends. Counts it in the metrics. A Flush
        follows each run of events that were ready together."""
        job_ids = [uuid.uuid4().hex for _ in jobs]
        tally = _Tally(began=time.monotonic())
        outcome = CANCELLED
        try:
            # Tokens per minute are reserved for the worst case, like the hold, and
            # corrected to what was delivered when the request ends.
            admission = await self.limiter.admit(
                caller.api_key_id,
                caller.account_id,
                sum(budget.max_prompt_tokens + budget.max_completion_tokens for _, budget in jobs),
                key_limits=caller.key_limits,
                account_limits=caller.account_limits,
            )
            run = _Run(
                model,
                rules,
                f"{id_prefix}-{job_ids[0]}",
                tuple(job_ids),
                admission.status,
                JobOrigin(request_id, caller.account_id, caller.subcloud_id, model.price),
                log.bind(request_id=request_id, job_id=job_ids[0], account_id=caller.account_id),
            )
            try:
                hold = await self._account.create_hold(
                    caller.account_id,
                    sum(worst_case_cost(model.price, budget) for _, budget in jobs),
                    idempotency_key=f"chat:{job_ids[0]}",
                    expires=datetime.now(UTC) + self._hold_ttl,
                )
                async with self._settling(run, hold, tally) as settlement:
                    self._inflight.open(
                        InFlightRequest(hold, request_id, tuple(job_ids), model.id, model.price)
                    )
                    for index, (job_id, (spec, _)) in enumerate(zip(job_ids, jobs, strict=True)):
                        choice = self._run_choice(run, index, job_id, spec, tally)
                        async with contextlib.aclosing(choice) as events:
                            async for event in events:
                                yield event
                        tally.end_choice()
                outcome = COMPLETED
                yield CompletionFinished(tally.finished, settlement.charged, tally.generation_s)
                # Releasing the rate limits below may wait (shared counters).
                yield FLUSH
            finally:
                await admission.release(tally.delivered.total_tokens)
        except DomainError as error:
            outcome = error.reason.value.lower()
            raise
        finally:
            self._count(OPERATIONS[id_prefix], model.id, outcome, tally)

    def _count(self, operation: str, model: str, outcome: str, tally: _Tally) -> None:
        metrics = self._metrics
        metrics.requests.inc(operation, model, outcome)
        metrics.request_duration.observe(time.monotonic() - tally.began, operation, model)
        billed = tally.delivered
        if billed.prompt_tokens:
            metrics.prompt_tokens.inc(model, amount=billed.prompt_tokens)
        if billed.completion_tokens:
            metrics.completion_tokens.inc(model, amount=billed.completion_tokens)

    @contextlib.asynccontextmanager
    async def _settling(
        self, run: _Run, hold: HoldRef, tally: _Tally
    ) -> AsyncIterator[_Settlement]:
        """Settles ``hold`` once for what the block delivered, however it ends: the
        finished choices when it completes, also the running one's tokens when it is
        cut short or fails."""
        settlement = _Settlement()
        try:
            yield settlement
        except BaseException:
            # The operators of the finished choices are credited; no node reported a
            # signed usage for the running one, so its tokens earn the platform.
            await self._settle(run, hold, tally.delivered, tally.shares)
            raise
        settlement.charged = await self._settle(run, hold, tally.finished, tally.shares)

    async def _run_choice(
        self, run: _Run, index: int, job_id: str, spec: GenerationSpec, tally: _Tally
    ) -> AsyncGenerator[CompletionEvent, None]:
        """One choice as one network job: ChoiceStarted (the first choice's preceded by
        CompletionStarted), its ContentDeltas, ChoiceFinished; a Flush after the events
        of each of the network's batches (those ready together). Counts what it
        delivered in ``tally``."""
        job = run.log.bind(job_id=job_id, choice=index)
        assigned_at: float | None = None
        gaps = _TokenGaps()
        async with contextlib.aclosing(
            self._network.run_job(job_id, spec, run.rules, run.origin)
        ) as batches:
            async for ready in batches:
                for event in ready:
                    if isinstance(event, JobAssigned):
                        job.info("job started", node_id=event.node_id)
                        assigned_at = time.monotonic()
                        if index == 0:
                            yield CompletionStarted(
                                run.completion_id,
                                run.model.id,
                                datetime.now(UTC),
                                run.rate_limits,
                                run.job_ids,
                            )
                        yield ChoiceStarted(index)
                    elif isinstance(event, JobDelta):
                        now = time.monotonic()
                        if tally.first_token_at is None:
                            tally.first_token_at = now
                            self._metrics.time_to_first_token.observe(
                                now - tally.began, run.model.id
                            )
                        gaps.add(now, event.token_count)
                        tally.add_delta(event.prompt_tokens, event.token_count)
                        yield ContentDelta(event.text, index, event.logprobs, event.embedding)
                    elif isinstance(event, JobMigrated):
                        job.info("job continues on another node", node_id=event.node_id)
                    else:
                        elapsed = 0.0 if assigned_at is None else time.monotonic() - assigned_at
                        tally.finish(event.usage.prompt_tokens, event.node_usage, elapsed)
                        if gaps.mean_s is not None:
                            self._metrics.inter_token_latency.observe(gaps.mean_s, run.model.id)
                        yield ChoiceFinished(index, event.finish_reason)
                        # What follows (the next choice's job, the settlement) waits.
                        yield FLUSH
                        return
                yield FLUSH

    async def _settle(self, run: _Run, hold: HoldRef, usage: Usage, shares: list[NodeUsage]) -> int:
        """Captures the cost of ``usage`` (at most the hold) and releases the rest, crediting
        the operators of ``shares``; returns the amount charged."""
        amount = cost(run.model.price, usage)
        capture = min(amount, hold.amount)
        if capture < amount:
            run.log.error(
                "usage exceeded the hold; charging the hold", cost=amount, hold=hold.amount
            )
        settlement = Settlement(hold.hold_id, capture, operator_shares(run.model.id, shares, usage))
        # A task outlives our cancellation: the hold is settled even if the client left.
        task = asyncio.create_task(self._settle_and_close(settlement))
        self._track(task)
        charged = await asyncio.shield(task)
        run.log.info("settled", charged=charged, held=hold.amount)
        return charged

    async def _settle_and_close(self, settlement: Settlement) -> int:
        charged = await self._settler.settle(settlement)
        # Forgetting the record is no part of the answer: the caller does not wait.
        self._track(asyncio.create_task(self._inflight.close(settlement.hold_id)))
        return charged

    def _track(self, task: asyncio.Task[Any]) -> None:
        """Keeps ``task`` until it ends, so that drain() waits for it."""
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)

    async def drain(self) -> None:
        """Waits for settlements in flight and what they start (used at shutdown)."""
        while self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    """What the choices of one admitted request share."""

    model: CatalogModel  # at the caller's price
    rules: NodeRequirements
    completion_id: str
    job_ids: tuple[str, ...]  # one per choice, in order
    rate_limits: RateStatus  # the caller's limits after admitting the request
    origin: JobOrigin  # whose request the jobs serve, for the network's job records
    log: structlog.typing.FilteringBoundLogger


@dataclasses.dataclass(slots=True)
class _Settlement:
    charged: int = 0


@dataclasses.dataclass(slots=True)
class _Tally:
    """What a request delivered so far: the choices that finished, the one running, and
    what each node delivered for the finished ones (for its operator)."""

    finished: Usage = dataclasses.field(default_factory=Usage)
    running: Usage = dataclasses.field(default_factory=Usage)
    shares: list[NodeUsage] = dataclasses.field(default_factory=list)
    generation_s: float = 0.0
    # When the request reached cloud, and when its first token came (monotonic).
    began: float = 0.0
    first_token_at: float | None = None

    @property
    def delivered(self) -> Usage:
        return _add(self.finished, self.running)

    def add_delta(self, prompt_tokens: int, token_count: int) -> None:
        self.running = Usage(
            prompt_tokens or self.running.prompt_tokens,
            self.running.completion_tokens + token_count,
        )

    def finish(
        self, prompt_tokens: int, node_usage: Sequence[NodeUsage], generation_s: float
    ) -> None:
        """The running choice's node finished: bill what the caller received, with the
        node's prompt count, which is final."""
        self.running = Usage(
            prompt_tokens or self.running.prompt_tokens, self.running.completion_tokens
        )
        self.shares.extend(node_usage)
        self.generation_s += generation_s

    def end_choice(self) -> None:
        self.finished, self.running = self.delivered, Usage()


@dataclasses.dataclass(slots=True)
class _TokenGaps:
    """One job's tokens after its first, and the time they took."""

    first_at: float | None = None
    last_at: float = 0.0
    tokens: int = 0

    def add(self, now: float, token_count: int) -> None:
        if self.first_at is None:
            self.first_at = now
            token_count -= 1  # the gaps are those after the first token
        self.last_at = now
        self.tokens += token_count

    @property
    def mean_s(self) -> float | None:
        if self.first_at is None or self.tokens <= 0:
            return None
        return (self.last_at - self.first_at) / self.tokens


def _offered(model: CatalogModel, subcloud: Subcloud | None) -> CatalogModel | None:
    """The model as the caller sees it: None if its subcloud does not offer it, else
    at the subcloud's price when it sets one."""
    if subcloud is None:
        return model
    offer = subcloud.offering(model.id)
    if offer is None:
        return None
    return model if offer.price is None else dataclasses.replace(model, price=offer.price)


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens)


def _add_call_piece(calls: list[ToolCall], delta: ToolCallDelta) -> None:
    """A call's first piece opens it; the next ones extend its arguments."""
    if delta.call_index == len(calls):
        calls.append(ToolCall(delta.id, delta.name, delta.arguments))
    else:
        call = calls[delta.call_index]
        calls[delta.call_index] = dataclasses.replace(
            call, arguments=call.arguments + delta.arguments
        )


async def _collect(events: AsyncGenerator[CompletionEvent, None]) -> ChatCompletion:
    """A whole completion from its stream of events."""
    started: CompletionStarted | None = None
    parts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    calls: dict[int, list[ToolCall]] = {}
    choices: list[Choice] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, CompletionStarted):
                started = event
            elif isinstance(event, ChoiceStarted):
                parts[event.index], logprobs[event.index], calls[event.index] = [], [], []
            elif isinstance(event, ContentDelta):
                parts[event.index].append(event.text)
                logprobs[event.index].extend(event.logprobs)
            elif isinstance(event, ToolCallDelta):
                _add_call_piece(calls[event.index], event)
            elif isinstance(event, ChoiceFinished):
                text = "".join(parts[event.index])
                choice_logprobs = tuple(logprobs[event.index])
                choices.append(
                    Choice(
                        event.index,
                        text,
                        event.finish_reason,
                        choice_logprobs,
                        tuple(calls[event.index]),
                    )
                )
            elif isinstance(event, CompletionFinished):
                assert started is not None  # a stream always starts first
                return ChatCompletion(started, tuple(choices), event)
    raise AssertionError("completion stream ended without finishing")
