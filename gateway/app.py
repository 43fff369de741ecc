"""The gateway's FastAPI app: the OpenAI HTTP API in front of cloud's InferenceService.

Routes validate JSON, call cloud with the caller's key and a request id in gRPC
metadata, and convert the reply; cloud holds all business logic.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar, cast

import grpc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from resultity.cloud.v1 import inference_service_pb2 as pb
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.channels import PLAINTEXT, Tls
from core.errors import InvalidArgument, quote
from core.metadata import AUTHORIZATION, GENERATION_MS, REQUEST_ID, Metadata, bearer_metadata
from core.metrics import NO_METRICS
from core.prometheus import CONTENT_TYPE, PrometheusMetrics
from core.regions import validate_region
from core.replica_channels import ReplicatedStub
from gateway import convert, errors, health, observe, responses_convert, sse
from gateway.cloud import Cloud, streamed, unary
from gateway.console import ConsoleTargets, console_router
from gateway.console.sessions import SessionStore
from gateway.errors import ApiError, RequestParams
from gateway.jobs import jobs_router
from gateway.openapi import REGION_HEADER, describe
from gateway.relay import (
    ClientGone,
    StreamEnding,
    client_gone_response,
    rate_limit_headers,
    stream_sse,
    unless_client_gone,
)
from gateway.responses_schemas import ResponseRequest, without_union_tags
from gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

if TYPE_CHECKING:
    from resultity.cloud.v1.inference_service_pb2_grpc import InferenceServiceAsyncStub

log = structlog.get_logger("gateway")

_Body = TypeVar(
    "_Body", ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponseRequest
)

_LIST_MODELS_TIMEOUT_S = 30.0
# Request bodies above this are refused (413) before parsing.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Longer than any key the platform issues.
MAX_API_KEY_LENGTH = 256
# What the platform itself added to the request's time, in milliseconds (see
# RequestIdMiddleware).
OVERHEAD_HEADER = "x-resultity-overhead-ms"
_OVERHEAD_HEADER = OVERHEAD_HEADER.encode()
_REQUEST_ID_HEADER = REQUEST_ID.encode()


def create_app(
    cloud_target: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tls: Tls = PLAINTEXT,
    console: ConsoleTargets | None = None,
    metrics: PrometheusMetrics | None = None,
    console_sessions: SessionStore | None = None,
) -> FastAPI:
    """The gateway app; its lifespan owns the gRPC channels to cloud at `cloud_target`
    (HOST:PORT, or cloud's replicas comma-separated: gateway/cloud.py). With
    `console`, it serves the web console at /console too, its sessions in
    `console_sessions` (default: this process's memory). With ``metrics``,
    requests are counted there and `GET /metrics` serves its registry (the whole
    process's); without, there is no /metrics."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cloud = Cloud(cloud_target, tls)
        app.state.cloud = cloud.inference
        app.state.jobs = cloud.jobs
        app.state.cloud_health = cloud.health
        log.info("gateway.cloud_channels_opened", targets=list(cloud.targets))
        try:
            yield
        finally:
            await cloud.close()

    app = FastAPI(
        title="Resultity gateway",
        # The request's span is RequestIdMiddleware's (gateway/observe.py), current
        # while the request is handled, so cloud calls are its children.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        lifespan=lifespan,
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.max_body_bytes = max_body_bytes
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(grpc.aio.AioRpcError, _rpc_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestIdMiddleware, metrics=observe.GatewayMetrics(metrics or NO_METRICS))
    for method, path, endpoint in _ROUTES:
        app.router.routes.append(_Route(path, endpoint, methods=[method]))
    app.include_router(jobs_router(_call_metadata))
    app.include_router(health.router)
    if console is not None:
        app.include_router(console_router(console, tls, console_sessions))
    if metrics is not None:
        app.add_api_route(
            "/metrics", _exposition(metrics), methods=["GET"], include_in_schema=False
        )
    describe(app)
    return app


# --- cross-cutting: request ids, error rendering -------------------------------------------


class RequestIdMiddleware:
    """Gives every request an id (response header `x-request-id`, log context, cloud metadata)
    and renders unhandled exceptions as the OpenAI envelope rather than plain text.

    It also sets `x-resultity-overhead-ms`: the time from receiving the request to
    starting the response, minus the time nodes spent generating before then (cloud
    reports that in trailing metadata; routes put it in `request.state.generation_ms`).
    A stream's response starts once a node has the job, before any generation, so
    there it is the time of admission and routing; a whole response starts after
    generation, so there it is the total less the nodes' time.

    A HEAD is answered as the GET of the same URL without its body, on every route:
    the same status and headers (a 401 without a key, a 404 for an unknown model),
    not the 405 of a route that serves GET alone."""

    def __init__(self, app: ASGIApp, metrics: observe.GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            # A scope of the app's own: the server's still says HEAD, so the server
            # sends no body and keeps the GET's content-length.
            scope = dict(scope)
        # 32 hex digits, as a UUID4's hex, at a fraction of its cost.
        request_id = secrets.token_hex(16)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        id_header = (_REQUEST_ID_HEADER, request_id.encode())
        status: int | None = None
        began = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.monotonic() - began) * 1000
                overhead_ms = max(0.0, elapsed_ms - float(state.get("generation_ms", 0.0)))
                # A new list: the response's own may be sent again.
                message["headers"] = [
                    *message.get("headers", ()),
                    id_header,
                    (_OVERHEAD_HEADER, b"%.1f" % overhead_ms),
                ]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        # Reset afterwards (structlog's bound_contextvars reads the whole context to
        # restore it).
        log_context = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            with observe.request_span(scope) as span:
                try:
                    if head:
                        scope["method"] = "GET"
                    await self.app(scope, receive, send_with_id)
                except Exception:
                    log.exception("gateway.unhandled_error", path=quote(scope["path"]))
                    if status is not None:
                        raise  # headers are out; the server aborts the connection
                    await errors.internal_error().response()(scope, receive, send_with_id)
                finally:
                    if head:
                        scope["method"] = "HEAD"  # as the log, metrics and span report it
                    elapsed = time.monotonic() - began
                    log.info(
                        "gateway.request",
                        method=scope["method"],
                        path=quote(scope["path"]),
                        status=status,
                        duration_ms=round(elapsed * 1000, 1),
                    )
                    self.metrics.request(scope, status, elapsed)
                    if span is not None:
                        observe.end_span(span, scope, status)
        finally:
            structlog.contextvars.reset_contextvars(**log_context)


async def _api_error(_: Request, exc: Exception) -> Response:
    return cast(ApiError, exc).response()


async def _rpc_error(request: Request, exc: Exception) -> Response:
    error = cast(grpc.aio.AioRpcError, exc)
    api_error = errors.from_rpc_error(error, getattr(request.state, "params", None))
    log.info("gateway.cloud_error", code=error.code().name, status=api_error.status)
    return api_error.response()


async def _validation_error(_: Request, exc: Exception) -> Response:
    # FastAPI's locations start with "body"/"query"/...; OpenAI's param is the field path.
    raw = cast(RequestValidationError, exc).errors()
    located = [{**error, "loc": tuple(error.get("loc", ()))[1:]} for error in raw]
    return errors.from_validation_errors(located).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    status = cast(StarletteHTTPException, exc).status_code
    return errors.from_http_status(status, request.method, request.url.path).response()


# --- helpers -----------------------------------------------------------------------------


def _cloud(request: Request) -> ReplicatedStub[InferenceServiceAsyncStub]:
    return cast("ReplicatedStub[InferenceServiceAsyncStub]", request.app.state.cloud)


def _call_metadata(request: Request) -> Metadata:
    """The caller's key and the request id, as cloud expects them; 401 without a key."""
    scheme, _, key = request.headers.get(AUTHORIZATION, "").partition(" ")
    key = key.strip()
    # gRPC metadata is ASCII; no valid key is anything else.
    if scheme.lower() != "bearer" or not key or not key.isascii() or not key.isprintable():
        raise errors.missing_api_key()
    # Refused here: gRPC would fail the call on metadata that large.
    if len(key) > MAX_API_KEY_LENGTH:
        raise errors.invalid_api_key()
    return (*bearer_metadata(key), (REQUEST_ID, request.state.request_id))


def _region(request: Request) -> str:
    """The region a request asks its nodes to be in (header REGION_HEADER), checked
    here: a header is no field of the request for cloud's errors to name."""
    region = request.headers.get(REGION_HEADER, "").strip()
    if region:
        try:
            validate_region(region, field=REGION_HEADER)
        except InvalidArgument as error:
            raise errors.bad_header(error.message) from None
    return region


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it exceeds the limit (whatever
    content-length claims), so a huge body is never held in memory."""
    limit: int = request.app.state.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(
    request: Request,
    model: type[_Body],
    located: Callable[[tuple[int | str, ...]], tuple[int | str, ...]] | None = None,
) -> _Body:
    """The body as ``model``; a 400 naming the first bad field, whose location
    ``located`` rewrites as the request names it."""
    body = await _read_body(request)
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        found = error.errors()
        if located is not None:
            found = [{**item, "loc": located(tuple(item["loc"]))} for item in found]
        raise errors.from_validation_errors(found) from None


def _bind_request(request: Request, model: str, **fields: object) -> None:
    """Log context of the request; before cloud has authenticated the caller, only a
    prefix of what the caller chose goes into the log. The model is kept for the
    request's metrics and span too (gateway/observe.py bounds it)."""
    setattr(request.state, observe.MODEL_STATE, model)
    structlog.contextvars.bind_contextvars(model=quote(model), **fields)


def _record_generation(request: Request, trailing: grpc.aio.Metadata | None) -> None:
    """Keeps cloud's report of the nodes' time for the overhead header."""
    for key, value in trailing or ():
        if key == GENERATION_MS:
            with contextlib.suppress(ValueError):
                request.state.generation_ms = float(value)


# --- routes ------------------------------------------------------------------------------

# The OpenAI endpoints take the request alone, so they are plain Starlette routes:
# FastAPI's per-request dependency solving would have nothing to solve (the OpenAPI
# document is gateway/openapi.py's, not inferred from routes).
_Endpoint = Callable[[Request], Awaitable[Response]]
_ROUTES: list[tuple[str, str, _Endpoint]] = []


class _Route(Route):
    """Names itself in the scope as FastAPI's routes do: the request's metrics and span
    are labelled by its template (gateway/observe.py)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def _route(method: str, path: str) -> Callable[[_Endpoint], _Endpoint]:
    def register(endpoint: _Endpoint) -> _Endpoint:
        _ROUTES.append((method, path, endpoint))
        return endpoint

    return register


_Stream = TypeVar("_Stream", pb.StreamChatCompletionResponse, pb.StreamCompletionResponse)


def _each_event(render: Callable[[_Stream], bytes | None]) -> Callable[[_Stream], bytes | None]:
    """``render`` of a message of one event, applied to each event of one of cloud's
    messages (those ready together): the chunks they would be one by one."""

    def render_events(message: _Stream) -> bytes | None:
        rendered = [render(event) for event in convert.single_events(message)]
        return b"".join(part for part in rendered if part is not None) or None

    return render_events


@_route("POST", "/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    metadata = _call_metadata(request)
    body = await _parse(request, ChatCompletionRequest)
    params = convert.params_from_request(body)
    params.region = _region(request)
    # Cloud names the effective limit max_tokens; the caller may have called it otherwise.
    renames = {"max_tokens": "max_completion_tokens"} if body.max_completion_tokens else {}
    request.state.params = RequestParams.of(ChatCompletionRequest, **renames)
    logprobs = bool(body.logprobs)
    _bind_request(request, body.model, stream=body.stream)
    cloud = _cloud(request)
    if body.stream:
        include_usage = body.include_usage

        def chunk(message: pb.StreamChatCompletionResponse) -> bytes | None:
            if convert.is_usage_only(message) and not include_usage:
                return None
            rendered = convert.chunk_from_proto(message, logprobs=logprobs)
            return sse.encode_chunk(rendered, include_usage=include_usage)

        streaming = pb.StreamChatCompletionRequest(params=params, batch_events=True)
        call, stream = streamed(
            cloud, lambda stub: stub.StreamChatCompletion(streaming, metadata=metadata)
        )
        return await stream_sse(
            request, call, stream, _each_event(chunk), held=convert.shows_nothing
        )
    whole = pb.CreateChatCompletionRequest(params=params)
    call, answer = unary(
        cloud, lambda stub: stub.CreateChatCompletion(whole, metadata=metadata), again=False
    )
    try:
        response = await unless_client_gone(request, call, answer)
    except ClientGone:
        return client_gone_response()
    _record_generation(request, await call.trailing_metadata())
    completion = convert.chat_completion_from_proto(response, logprobs=logprobs)
    return _json(completion.model_dump_json(), await rate_limit_headers(call))


@_route("POST", "/v1/completions")
async def completions(request: Request) -> Response:
    metadata = _call_metadata(request)
    body = await _parse(request, CompletionRequest)
    params = convert.text_params_from_request(body)
    params.region = _region(request)
    # A node reports a prompt too long for its context as the messages'.
    request.state.params = RequestParams.of(CompletionRequest, messages="prompt")
    logprobs = body.logprobs is not None
    _bind_request(request, body.model, stream=body.stream)
    cloud = _cloud(request)
    if body.stream:
        include_usage = body.include_usage
        offsets: dict[int, int] = {}

        def chunk(message: pb.StreamCompletionResponse) -> bytes | None:
            if not message.choices and not (include_usage and message.HasField("usage")):
                return None  # the opening message, or usage nobody asked for
            rendered = convert.text_chunk_from_proto(message, logprobs=logprobs, offsets=offsets)
            return sse.encode_chunk(rendered, include_usage=include_usage)

        streaming = pb.StreamCompletionRequest(params=params, batch_events=True)
        call, stream = streamed(
            cloud, lambda stub: stub.StreamCompletion(streaming, metadata=metadata)
        )
        return await stream_sse(
            request, call, stream, _each_event(chunk), held=convert.text_shows_nothing
        )
    whole = pb.CreateCompletionRequest(params=params)
    call, answer = unary(
        cloud, lambda stub: stub.CreateCompletion(whole, metadata=metadata), again=False
    )
    try:
        response = await unless_client_gone(request, call, answer)
    except ClientGone:
        return client_gone_response()
    _record_generation(request, await call.trailing_metadata())
    completion = convert.text_completion_from_proto(response, logprobs=logprobs)
    return _json(completion.model_dump_json(), await rate_limit_headers(call))


@_route("POST", "/v1/responses")
async def responses(request: Request) -> Response:
    """The Responses API, answered by a chat completion (gateway/responses_convert.py)."""
    metadata = _call_metadata(request)
    body = await _parse(request, ResponseRequest, without_union_tags)
    params = responses_convert.params_from_request(body)
    params.region = _region(request)
    request.state.params = RequestParams.of(ResponseRequest, **responses_convert.PARAM_RENAMES)
    _bind_request(request, body.model, stream=body.stream)
    cloud = _cloud(request)
    if body.stream:
        # Its rendering takes the events of a message in order, however many. The
        # events of a role or a finish alone (the response's opening, an item's end)
        # wait for the next part, as the chat chunks they answer do.
        events = responses_convert.ResponseEvents(body, sse.encode_response_event)
        streaming = pb.StreamChatCompletionRequest(params=params, batch_events=True)
        call, stream = streamed(
            cloud, lambda stub: stub.StreamChatCompletion(streaming, metadata=metadata)
        )
        ending = StreamEnding(b"", events.failed)
        return await stream_sse(
            request, call, stream, events.render, ending, held=convert.shows_nothing
        )
    whole = pb.CreateChatCompletionRequest(params=params)
    call, answer = unary(
        cloud, lambda stub: stub.CreateChatCompletion(whole, metadata=metadata), again=False
    )
    try:
        completion = await unless_client_gone(request, call, answer)
    except ClientGone:
        return client_gone_response()
    _record_generation(request, await call.trailing_metadata())
    rendered = responses_convert.response_from_proto(body, completion)
    return _json(rendered.model_dump_json(), await rate_limit_headers(call))


@_route("POST", "/v1/embeddings")
async def embeddings(request: Request) -> Response:
    metadata = _call_metadata(request)
    body = await _parse(request, EmbeddingRequest)
    request.state.params = RequestParams.of(EmbeddingRequest, messages="input")
    _bind_request(request, body.model)
    embed = pb.CreateEmbeddingsRequest(
        model=body.model, inputs=body.input, user=body.user or "", region=_region(request)
    )
    call, answer = unary(
        _cloud(request), lambda stub: stub.CreateEmbeddings(embed, metadata=metadata), again=False
    )
    try:
        response = await unless_client_gone(request, call, answer)
    except ClientGone:
        return client_gone_response()
    rendered = convert.embeddings_from_proto(response, body.encoding_format)
    return _json(rendered.model_dump_json(), await rate_limit_headers(call))


@_route("GET", "/v1/models")
async def list_models(request: Request) -> Response:
    metadata = _call_metadata(request)
    call, answer = unary(
        _cloud(request),
        lambda stub: stub.ListModels(
            pb.ListModelsRequest(), metadata=metadata, timeout=_LIST_MODELS_TIMEOUT_S
        ),
        again=True,
    )
    try:
        response = await unless_client_gone(request, call, answer)
    except ClientGone:
        return client_gone_response()
    return _json(convert.model_list_from_proto(response).model_dump_json())


@_route("GET", "/v1/models/{model:path}")
async def get_model(request: Request) -> Response:
    metadata = _call_metadata(request)
    wanted = pb.GetModelRequest(model=request.path_params["model"])
    call, answer = unary(
        _cloud(request),
        lambda stub: stub.GetModel(wanted, metadata=metadata, timeout=_LIST_MODELS_TIMEOUT_S),
        again=True,
    )
    try:
        response = await unless_client_gone(request, call, answer)
    except ClientGone:
        return client_gone_response()
    return _json(convert.model_card_from_proto(response.model).model_dump_json())


def _exposition(metrics: PrometheusMetrics) -> Callable[[], Awaitable[Response]]:
    async def exposition() -> Response:
        return Response(content=metrics.exposition(), media_type=CONTENT_TYPE)

    return exposition


def _json(content: str, headers: dict[str, str] | None = None) -> Response:
    return Response(content=content, media_type="application/json", headers=headers)


__all__ = ["RequestIdMiddleware", "create_app"]
