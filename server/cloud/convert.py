"""Conversions between cloud's inference API and its domain shapes (requests.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2 as common_pb

from core.convert.catalog import price_to_pb
from core.convert.generation import (
    finish_reason_to_pb,
    logit_bias_from_pb,
    logprobs_to_pb,
    messages_from_pb,
    response_format_from_pb,
    role_to_pb,
    tool_calls_to_pb,
    tool_choice_from_pb,
    tools_from_pb,
    usage_to_pb,
)
from core.inference import CatalogModel, ChatRole
from server.cloud.requests import (
    ChatCompletion,
    ChatRequest,
    ChoiceFinished,
    ChoiceStarted,
    CompletionEvent,
    CompletionFinished,
    CompletionStarted,
    ContentDelta,
    Embeddings,
    TextRequest,
    ToolCallDelta,
)
from server.common.transport import timestamp_to_pb

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
        "logit_bias": logit_bias_from_pb(params.logit_bias),
    }


def chat_request_from_pb(params: pb.ChatCompletionParams) -> ChatRequest:
    return ChatRequest(
        messages=messages_from_pb(list(params.messages)),
        response_format=response_format_from_pb(params.response_format),
        tools=tools_from_pb(params.tools),
        tool_choice=tool_choice_from_pb(params.tool_choice),
        tool_choice_function=params.tool_choice.function_name,
        parallel_tool_calls=(
            params.parallel_tool_calls if params.HasField("parallel_tool_calls") else None
        ),
        **_generation_fields(params),
    )


def text_request_from_pb(params: pb.CompletionParams) -> TextRequest:
    return TextRequest(prompts=tuple(params.prompts), **_generation_fields(params))


def _billing(charged: int) -> pb.Billing:
    return pb.Billing(charged_micro_credits=charged)


def model_to_pb(model: CatalogModel) -> pb.Model:
    return pb.Model(
        id=model.id,
        owned_by=model.owned_by,
        created=None if model.created is None else timestamp_to_pb(model.created),
        price=price_to_pb(model.price),
        context_length=model.context_length,
    )


def stream_header(started: CompletionStarted) -> dict[str, Any]:
    """The fields every message of a streamed completion repeats."""
    return {
        "id": started.completion_id,
        "model": started.model,
        "created": timestamp_to_pb(started.created),
    }


def chat_completion_to_pb(completion: ChatCompletion) -> pb.CreateChatCompletionResponse:
    return pb.CreateChatCompletionResponse(
        **stream_header(completion.started),
        choices=[
            pb.ChatCompletionChoice(
                index=choice.index,
                message=common_pb.ChatMessage(
                    role=role_to_pb(ChatRole.ASSISTANT),
                    content=choice.content,
                    tool_calls=tool_calls_to_pb(choice.tool_calls),
                ),
                finish_reason=finish_reason_to_pb(choice.finish_reason),
                logprobs=logprobs_to_pb(choice.logprobs),
            )
            for choice in completion.choices
        ],
        usage=usage_to_pb(completion.finished.usage),
        billing=_billing(completion.finished.charged),
    )


def text_completion_to_pb(completion: ChatCompletion) -> pb.CreateCompletionResponse:
    return pb.CreateCompletionResponse(
        **stream_header(completion.started),
        choices=[
            pb.CompletionChoice(
                index=choice.index,
                text=choice.content,
                finish_reason=finish_reason_to_pb(choice.finish_reason),
                logprobs=logprobs_to_pb(choice.logprobs),
            )
            for choice in completion.choices
        ],
        usage=usage_to_pb(completion.finished.usage),
        billing=_billing(completion.finished.charged),
    )


def chat_chunk_to_pb(
    event: CompletionEvent, header: dict[str, Any]
) -> pb.StreamChatCompletionResponse | None:
    """A streamed chat completion's message for ``event``; None for CompletionStarted,
    whose fields (``header``) the other messages repeat."""
    if isinstance(event, ContentDelta):
        delta = pb.ChatCompletionDelta(
            index=event.index, content=event.text, logprobs=logprobs_to_pb(event.logprobs)
        )
    elif isinstance(event, ToolCallDelta):
        call = pb.ToolCallDelta(
            index=event.call_index, id=event.id, name=event.name, arguments=event.arguments
        )
        delta = pb.ChatCompletionDelta(index=event.index, tool_calls=[call])
    elif isinstance(event, ChoiceStarted):
        delta = pb.ChatCompletionDelta(index=event.index, role=role_to_pb(ChatRole.ASSISTANT))
    elif isinstance(event, ChoiceFinished):
        reason = finish_reason_to_pb(event.finish_reason)
        delta = pb.ChatCompletionDelta(index=event.index, finish_reason=reason)
    elif isinstance(event, CompletionFinished):
        return pb.StreamChatCompletionResponse(
            usage=usage_to_pb(event.usage), billing=_billing(event.charged), **header
        )
    else:
        return None
    return pb.StreamChatCompletionResponse(choices=[delta], **header)


def text_chunk_to_pb(
    event: CompletionEvent, header: dict[str, Any]
) -> pb.StreamCompletionResponse | None:
    """A streamed text completion's message for ``event``: CompletionStarted opens the
    stream with ``header`` alone (a node has the job); ChoiceStarted sends nothing."""
    if isinstance(event, ContentDelta):
        delta = pb.CompletionDelta(
            index=event.index, text=event.text, logprobs=logprobs_to_pb(event.logprobs)
        )
    elif isinstance(event, ChoiceFinished):
        reason = finish_reason_to_pb(event.finish_reason)
        delta = pb.CompletionDelta(index=event.index, finish_reason=reason)
    elif isinstance(event, CompletionFinished):
        return pb.StreamCompletionResponse(
            usage=usage_to_pb(event.usage), billing=_billing(event.charged), **header
        )
    elif isinstance(event, CompletionStarted):
        return pb.StreamCompletionResponse(**header)
    else:
        return None
    return pb.StreamCompletionResponse(choices=[delta], **header)


def chat_events_to_pb(
    events: Sequence[CompletionEvent], header: dict[str, Any]
) -> pb.StreamChatCompletionResponse | None:
    """Events ready together as one message (StreamChatCompletionRequest.batch_events):
    the messages of each, merged (their deltas in order, usage and billing of the
    CompletionFinished after them); None when none of them has a message."""
    return _merged([chat_chunk_to_pb(event, header) for event in events])


def text_events_to_pb(
    events: Sequence[CompletionEvent], header: dict[str, Any]
) -> pb.StreamCompletionResponse | None:
    """As ``chat_events_to_pb``, for a text completion (StreamCompletionRequest): the
    opening message's ``header`` merges into the deltas ready with it."""
    return _merged([text_chunk_to_pb(event, header) for event in events])


_Stream = TypeVar("_Stream", pb.StreamChatCompletionResponse, pb.StreamCompletionResponse)


def _merged(messages: list[_Stream | None]) -> _Stream | None:
    merged: _Stream | None = None
    for message in messages:
        if message is None:
            continue
        if merged is None:
            merged = message
        else:
            merged.MergeFrom(message)
    return merged


def embeddings_to_pb(embeddings: Embeddings) -> pb.CreateEmbeddingsResponse:
    return pb.CreateEmbeddingsResponse(
        model=embeddings.model,
        embeddings=[
            pb.Embedding(index=index, values=vector)
            for index, vector in enumerate(embeddings.vectors)
        ],
        usage=usage_to_pb(embeddings.usage),
        billing=_billing(embeddings.charged),
    )
