"""gRPC transport of the cloud inference API: conversions around InferenceService."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.cloud.v1 import inference_service_pb2_grpc as pb_grpc
from resultity.common.v1 import inference_pb2 as common_pb

from core.convert.catalog import price_to_pb
from core.convert.generation import (
    finish_reason_to_pb,
    logprobs_to_pb,
    messages_from_pb,
    response_format_from_pb,
    role_to_pb,
    usage_to_pb,
)
from core.grpc_errors import translate_errors
from core.inference import CatalogModel, ChatRole
from core.metadata import GENERATION_MS, REQUEST_ID
from server.cloud.inference import InferenceService
from server.cloud.rate_limits import RateStatus
from server.cloud.requests import (
    ChatRequest,
    ChoiceFinished,
    ChoiceStarted,
    CompletionFinished,
    CompletionStarted,
    ContentDelta,
    EmbeddingRequest,
    TextRequest,
)
from server.common.transport import authorization, metadata_value, timestamp_to_pb


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    return metadata_value(context, REQUEST_ID) or uuid.uuid4().hex


_OptionalField = Literal[
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
]


def _generation_fields(params: pb.ChatCompletionParams | pb.CompletionParams) -> dict[str, Any]:
    """The fields chat and text completions share (requests.GenerationRequest)."""

    def optional(name: _OptionalField) -> Any:
        return getattr(params, name) if params.HasField(name) else None

    return {
        "model": params.model,
        "max_tokens": optional("max_tokens"),
        "temperature": optional("temperature"),
        "top_p": optional("top_p"),
        "stop": tuple(params.stop),
        "seed": optional("seed"),
        "user": params.user,
        "region": params.region,
        "n": params.n if params.HasField("n") else 1,
        "presence_penalty": optional("presence_penalty"),
        "frequency_penalty": optional("frequency_penalty"),
        "logprobs": params.logprobs,
        "top_logprobs": optional("top_logprobs"),
    }


def _chat_request(params: pb.ChatCompletionParams) -> ChatRequest:
    return ChatRequest(
        messages=messages_from_pb(list(params.messages)),
        response_format=response_format_from_pb(params.response_format),
        **_generation_fields(params),
    )


def _text_request(params: pb.CompletionParams) -> TextRequest:
    return TextRequest(prompts=tuple(params.prompts), **_generation_fields(params))


def _billing(finished: CompletionFinished) -> pb.Billing:
    return pb.Billing(charged_micro_credits=finished.charged)


def _report_generation(
    context: grpc.aio.ServicerContext[Any, Any], finished: CompletionFinished
) -> None:
    """The nodes' time on the request's jobs, from assignment to end as cloud saw it,
    so a caller can tell the platform's own time."""
    context.set_trailing_metadata(((GENERATION_MS, f"{finished.generation_s * 1000:.1f}"),))


async def _report_rate_limits(
    context: grpc.aio.ServicerContext[Any, Any], started: CompletionStarted | RateStatus | None
) -> None:
    """The caller's x-ratelimit-* state, in initial metadata (the gateway copies it).

    Without limits there is nothing to report: gRPC then sends the initial metadata
    with the first message instead of in a send operation of its own."""
    status = started.rate_limits if isinstance(started, CompletionStarted) else started
    headers = () if status is None else status.headers()
    if headers:
        await context.send_initial_metadata(headers)


def _model_pb(model: CatalogModel) -> pb.Model:
    return pb.Model(
        id=model.id,
        owned_by=model.owned_by,
        price=price_to_pb(model.price),
        context_length=model.context_length,
    )


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
            _chat_request(request.params),
            _request_id(context),
        )
        started, finished = completion.started, completion.finished
        await _report_rate_limits(context, started)
        _report_generation(context, finished)
        return pb.CreateChatCompletionResponse(
            id=started.completion_id,
            model=started.model,
            created=timestamp_to_pb(started.created),
            choices=[
                pb.ChatCompletionChoice(
                    index=choice.index,
                    message=common_pb.ChatMessage(
                        role=role_to_pb(ChatRole.ASSISTANT), content=choice.content
                    ),
                    finish_reason=finish_reason_to_pb(choice.finish_reason),
                    logprobs=logprobs_to_pb(choice.logprobs),
                )
                for choice in completion.choices
            ],
            usage=usage_to_pb(finished.usage),
            billing=_billing(finished),
        )

    @translate_errors
    async def StreamChatCompletion(
        self,
        request: pb.StreamChatCompletionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamChatCompletionResponse]:
        events = self._inference.stream(
            authorization(context),
            _chat_request(request.params),
            _request_id(context),
        )
        header: dict[str, Any] = {}
        try:
            async for event in events:
                if isinstance(event, CompletionStarted):
                    await _report_rate_limits(context, event)
                    header = {
                        "id": event.completion_id,
                        "model": event.model,
                        "created": timestamp_to_pb(event.created),
                    }
                    continue
                if isinstance(event, ChoiceStarted):
                    role = role_to_pb(ChatRole.ASSISTANT)
                    delta = pb.ChatCompletionDelta(index=event.index, role=role)
                elif isinstance(event, ContentDelta):
                    delta = pb.ChatCompletionDelta(
                        index=event.index,
                        content=event.text,
                        logprobs=logprobs_to_pb(event.logprobs),
                    )
                elif isinstance(event, ChoiceFinished):
                    reason = finish_reason_to_pb(event.finish_reason)
                    delta = pb.ChatCompletionDelta(index=event.index, finish_reason=reason)
                else:
                    _report_generation(context, event)
                    yield pb.StreamChatCompletionResponse(
                        usage=usage_to_pb(event.usage), billing=_billing(event), **header
                    )
                    continue
                yield pb.StreamChatCompletionResponse(choices=[delta], **header)
        finally:
            await events.aclose()

    @translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        models = await self._inference.list_models(authorization(context))
        return pb.ListModelsResponse(models=[_model_pb(model) for model in models])

    @translate_errors
    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelResponse:
        model = await self._inference.get_model(authorization(context), request.model)
        return pb.GetModelResponse(model=_model_pb(model))

    @translate_errors
    async def CreateCompletion(
        self, request: pb.CreateCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateCompletionResponse:
        completion = await self._inference.complete_text(
            authorization(context),
            _text_request(request.params),
            _request_id(context),
        )
        started, finished = completion.started, completion.finished
        await _report_rate_limits(context, started)
        _report_generation(context, finished)
        return pb.CreateCompletionResponse(
            id=started.completion_id,
            model=started.model,
            created=timestamp_to_pb(started.created),
            choices=[
                pb.CompletionChoice(
                    index=choice.index,
                    text=choice.content,
                    finish_reason=finish_reason_to_pb(choice.finish_reason),
                    logprobs=logprobs_to_pb(choice.logprobs),
                )
                for choice in completion.choices
            ],
            usage=usage_to_pb(finished.usage),
            billing=_billing(finished),
        )

    @translate_errors
    async def StreamCompletion(
        self, request: pb.StreamCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamCompletionResponse]:
        events = self._inference.stream_text(
            authorization(context),
            _text_request(request.params),
            _request_id(context),
        )
        header: dict[str, Any] = {}
        try:
            async for event in events:
                if isinstance(event, CompletionStarted):
                    await _report_rate_limits(context, event)
                    header = {
                        "id": event.completion_id,
                        "model": event.model,
                        "created": timestamp_to_pb(event.created),
                    }
                    # Tells the caller the job has a node before any text exists.
                    yield pb.StreamCompletionResponse(**header)
                elif isinstance(event, ContentDelta):
                    delta = pb.CompletionDelta(
                        index=event.index, text=event.text, logprobs=logprobs_to_pb(event.logprobs)
                    )
                    yield pb.StreamCompletionResponse(choices=[delta], **header)
                elif isinstance(event, ChoiceFinished):
                    reason = finish_reason_to_pb(event.finish_reason)
                    delta = pb.CompletionDelta(index=event.index, finish_reason=reason)
                    yield pb.StreamCompletionResponse(choices=[delta], **header)
                elif isinstance(event, CompletionFinished):
                    _report_generation(context, event)
                    yield pb.StreamCompletionResponse(
                        usage=usage_to_pb(event.usage), billing=_billing(event), **header
                    )
        finally:
            await events.aclose()

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
        return pb.CreateEmbeddingsResponse(
            model=embeddings.model,
            embeddings=[
                pb.Embedding(index=index, values=vector)
                for index, vector in enumerate(embeddings.vectors)
            ],
            usage=usage_to_pb(embeddings.usage),
            billing=pb.Billing(charged_micro_credits=embeddings.charged),
        )
