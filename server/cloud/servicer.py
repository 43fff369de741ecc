"""gRPC transport of the cloud inference API: conversions around InferenceService."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc
import structlog
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc as pb_grpc

from core import tracing
from core.errors import DomainError
from core.grpc_errors import translate_errors
from core.metadata import GENERATION_MS, REQUEST_ID
from server.cloud.convert import (
    chat_completion_to_pb,
    chat_events_to_pb,
    chat_request_from_pb,
    embeddings_to_pb,
    model_to_pb,
    stream_header,
    text_completion_to_pb,
    text_events_to_pb,
    text_request_from_pb,
)
from server.cloud.inference import InferenceService
from server.cloud.rate_limits import RateStatus
from server.cloud.requests import (
    CompletionEvent,
    CompletionFinished,
    CompletionStarted,
    EmbeddingRequest,
    Flush,
)
from server.common.transport import authorization, metadata_value


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's request id (a new one if it sent none), bound to this call's logs
    (each call runs in a task of its own)."""
    request_id = metadata_value(context, REQUEST_ID) or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return request_id


def _report_generation(
    context: grpc.aio.ServicerContext[Any, Any], finished: CompletionFinished
) -> None:
    """The nodes' time on the request's jobs, from assignment to end as cloud saw it,
    so a caller can tell the platform's own time."""
    context.set_trailing_metadata(((GENERATION_MS, f"{finished.generation_s * 1000:.1f}"),))
    if tracing.enabled():
        tracing.annotate(
            {
                tracing.GEN_AI_INPUT_TOKENS: finished.usage.prompt_tokens,
                tracing.GEN_AI_OUTPUT_TOKENS: finished.usage.completion_tokens,
            }
        )


async def _report_rate_limits(
    context: grpc.aio.ServicerContext[Any, Any], started: CompletionStarted | RateStatus | None
) -> None:
    """The caller's x-ratelimit-* state, in initial metadata (the gateway copies it).

    Without limits there is nothing to report: gRPC then sends the initial metadata
    with the first message instead of in a send operation of its own."""
    if isinstance(started, CompletionStarted) and tracing.enabled():
        tracing.annotate(
            {
                tracing.GEN_AI_PROVIDER: tracing.PROVIDER,
                tracing.GEN_AI_REQUEST_MODEL: started.model,
                tracing.GEN_AI_RESPONSE_ID: started.completion_id,
                tracing.GEN_AI_RESPONSE_MODEL: started.model,
            }
        )
    status = started.rate_limits if isinstance(started, CompletionStarted) else started
    headers = () if status is None else status.headers()
    if headers:
        await context.send_initial_metadata(headers)


async def _report_event(context: grpc.aio.ServicerContext[Any, Any], event: object) -> None:
    """The metadata a streamed completion's start and end report."""
    if isinstance(event, CompletionStarted):
        await _report_rate_limits(context, event)
    elif isinstance(event, CompletionFinished):
        _report_generation(context, event)


_Message = TypeVar("_Message")


async def _messages(
    context: grpc.aio.ServicerContext[Any, Any],
    events: AsyncGenerator[CompletionEvent, None],
    to_pb: Callable[[Sequence[CompletionEvent], dict[str, Any]], _Message | None],
    *,
    batched: bool,
) -> AsyncIterator[_Message]:
    """A streamed completion's messages: ``to_pb`` of each event, or (``batched``: then
    ``events`` has Flushes) of the events up to each Flush, those ready together."""
    header: dict[str, Any] = {}
    ready: list[CompletionEvent] = []
    try:
        async for event in events:
            if not isinstance(event, Flush):
                await _report_event(context, event)
                if isinstance(event, CompletionStarted):
                    header = stream_header(event)
                ready.append(event)
                if batched:
                    continue
            message = to_pb(ready, header)
            ready = []
            if message is not None:
                yield message
    except DomainError:
        # The events ready with the failure go out before it, as they would one by one.
        message = to_pb(ready, header) if ready else None
        if message is not None:
            yield message
        raise
    finally:
        await events.aclose()


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, inference: InferenceService) -> None:
        self._inference = inference

    @translate_errors
    async def CreateChatCompletion(
        self,
        request: pb.CreateChatCompletionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CreateChatCompletionResponse:
        completion = await self._inference.complete(
            authorization(context),
            chat_request_from_pb(request.params),
            _request_id(context),
        )
        await _report_rate_limits(context, completion.started)
        _report_generation(context, completion.finished)
        return chat_completion_to_pb(completion)

    @translate_errors
    async def StreamChatCompletion(
        self,
        request: pb.StreamChatCompletionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        batched = request.batch_events
        events = self._inference.stream(
            authorization(context),
            chat_request_from_pb(request.params),
            _request_id(context),
            flushes=batched,
        )
        async for message in _messages(context, events, chat_events_to_pb, batched=batched):
            yield message

    @translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        models = await self._inference.list_models(authorization(context))
        return pb.ListModelsResponse(models=[model_to_pb(model) for model in models])

    @translate_errors
    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        model = await self._inference.get_model(authorization(context), request.model)
        return pb.GetModelResponse(model=model_to_pb(model))

    @translate_errors
    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateCompletionResponse:
        completion = await self._inference.complete_text(
            authorization(context),
            text_request_from_pb(request.params),
            _request_id(context),
        )
        await _report_rate_limits(context, completion.started)
        _report_generation(context, completion.finished)
        return text_completion_to_pb(completion)

    @translate_errors
    async def StreamCompletion(
        self, request: pb.StreamCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        batched = request.batch_events
        events = self._inference.stream_text(
            authorization(context),
            text_request_from_pb(request.params),
            _request_id(context),
            flushes=batched,
        )
        async for message in _messages(context, events, text_events_to_pb, batched=batched):
            yield message

    @translate_errors
    async def CreateEmbeddings(
        self, request: pb.CreateEmbeddingsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateEmbeddingsResponse:
        embeddings = await self._inference.embed(
            authorization(context),
            EmbeddingRequest(
                request.model, tuple(request.inputs), request.user, region=request.region
            ),
            _request_id(context),
        )
        await _report_rate_limits(context, embeddings.rate_limits)
        return embeddings_to_pb(embeddings)
