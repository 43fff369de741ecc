"""Conversions between the OpenAI JSON models and cloud's protobuf messages.

Pure functions: no I/O, no policy. Cloud decides everything; these only rename.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from gateway import schemas

_ROLES: dict[str, inference_pb2.ChatRole.ValueType] = {
    "system": inference_pb2.CHAT_ROLE_SYSTEM,
    "user": inference_pb2.CHAT_ROLE_USER,
    "assistant": inference_pb2.CHAT_ROLE_ASSISTANT,
}

# A cancelled job ended because the caller stopped it; OpenAI has no such reason and
# reports "stop" for a generation that ended on request.
_FINISH_REASONS: dict[inference_pb2.FinishReason.ValueType, schemas.FinishReason] = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
}


_FORMATS: dict[str, inference_pb2.ResponseFormatType.ValueType] = {
    "text": inference_pb2.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}


def _response_format(
    response_format: schemas.ResponseFormat | None,
) -> inference_pb2.ResponseFormat | None:
    if response_format is None:
        return None
    schema = response_format.json_schema
    return inference_pb2.ResponseFormat(
        type=_FORMATS[response_format.type],
        json_schema=json.dumps(schema.json_schema)
        if schema is not None and response_format.type == "json_schema"
        else "",
    )


def params_from_request(request: schemas.ChatCompletionRequest) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(
        model=request.model,
        messages=[
            inference_pb2.ChatMessage(role=_ROLES[message.role], content=message.text)
            for message in request.messages
        ],
        max_tokens=request.effective_max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop or [],
        seed=request.seed,
        user=request.user or "",
        n=request.n,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs,
        response_format=_response_format(request.response_format),
    )


def finish_reason(value: inference_pb2.FinishReason.ValueType) -> schemas.FinishReason | None:
    """None while a choice is still generating (FINISH_REASON_UNSPECIFIED)."""
    return _FINISH_REASONS.get(value)


def _unix_seconds(timestamp: Timestamp) -> int:
    return int(timestamp.seconds)


def _usage(usage: inference_pb2.Usage) -> schemas.Usage:
    return schemas.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _logprobs(
    logprobs: Sequence[inference_pb2.TokenLogprob], requested: bool
) -> schemas.ChoiceLogprobs | None:
    if not requested:
        return None
    return schemas.ChoiceLogprobs(
        content=[
            schemas.TokenLogprob(
                token=item.token,
                logprob=item.logprob,
                bytes=list(item.bytes),
                top_logprobs=[
                    schemas.TopLogprob(token=top.token, logprob=top.logprob, bytes=list(top.bytes))
                    for top in item.top_logprobs
                ],
            )
            for item in logprobs
        ]
    )


def chat_completion_from_proto(
    response: pb.CreateChatCompletionResponse, *, logprobs: bool = False
) -> schemas.ChatCompletion:
    return schemas.ChatCompletion(
        id=response.id,
        created=_unix_seconds(response.created),
        model=response.model,
        choices=[
            schemas.Choice(
                index=choice.index,
                message=schemas.AssistantMessage(content=choice.message.content),
                logprobs=_logprobs(choice.logprobs, logprobs),
                # A finished completion always has a reason; OpenAI's schema requires one.
                finish_reason=finish_reason(choice.finish_reason) or "stop",
            )
            for choice in response.choices
        ],
        usage=_usage(response.usage),
    )


def _delta(delta: pb.ChatCompletionDelta) -> schemas.Delta:
    if delta.role != inference_pb2.CHAT_ROLE_UNSPECIFIED:
        # The opening delta: OpenAI sends the role with empty content.
        return schemas.Delta(role="assistant", content=delta.content)
    return schemas.Delta(content=delta.content or None)


def chunk_from_proto(
    message: pb.StreamChatCompletionResponse, *, logprobs: bool = False
) -> schemas.ChatCompletionChunk:
    return schemas.ChatCompletionChunk(
        id=message.id,
        created=_unix_seconds(message.created),
        model=message.model,
        choices=[
            schemas.ChunkChoice(
                index=delta.index,
                delta=_delta(delta),
                # Content deltas carry their tokens' logprobs; the role and finish deltas none.
                logprobs=_logprobs(delta.logprobs, logprobs and bool(delta.content)),
                finish_reason=finish_reason(delta.finish_reason),
            )
            for delta in message.choices
        ],
        usage=_usage(message.usage) if message.HasField("usage") else None,
    )


def is_usage_only(message: pb.StreamChatCompletionResponse) -> bool:
    """The closing message of a stream, sent to callers only with include_usage."""
    return not message.choices


def model_list_from_proto(response: pb.ListModelsResponse) -> schemas.ModelList:
    return schemas.ModelList(data=[model_card_from_proto(model) for model in response.models])


def text_params_from_request(request: schemas.CompletionRequest) -> pb.CompletionParams:
    return pb.CompletionParams(
        model=request.model,
        prompts=request.prompt,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop or [],
        seed=request.seed,
        user=request.user or "",
        n=request.n,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs,
    )


def _text_logprobs(
    logprobs: Sequence[inference_pb2.TokenLogprob], requested: bool, offset: int = 0
) -> schemas.CompletionLogprobs | None:
    """The legacy shape; ``offset`` is where the tokens' text starts in the choice's text."""
    if not requested:
        return None
    offsets = []
    for item in logprobs:
        offsets.append(offset)
        offset += len(item.token)
    return schemas.CompletionLogprobs(
        tokens=[item.token for item in logprobs],
        token_logprobs=[item.logprob for item in logprobs],
        top_logprobs=[{top.token: top.logprob for top in item.top_logprobs} for item in logprobs],
        text_offset=offsets,
    )


def text_completion_from_proto(
    response: pb.CreateCompletionResponse, *, logprobs: bool = False
) -> schemas.TextCompletion:
    return schemas.TextCompletion(
        id=response.id,
        created=_unix_seconds(response.created),
        model=response.model,
        choices=[
            schemas.TextChoice(
                index=choice.index,
                text=choice.text,
                logprobs=_text_logprobs(choice.logprobs, logprobs),
                finish_reason=finish_reason(choice.finish_reason) or "stop",
            )
            for choice in response.choices
        ],
        usage=_usage(response.usage),
    )


def text_chunk_from_proto(
    message: pb.StreamCompletionResponse, *, logprobs: bool = False, offsets: dict[int, int]
) -> schemas.TextCompletion:
    """One chunk; ``offsets`` (choice index -> text sent so far) is updated."""
    choices = []
    for delta in message.choices:
        offset = offsets.get(delta.index, 0)
        choices.append(
            schemas.TextChoice(
                index=delta.index,
                text=delta.text,
                logprobs=_text_logprobs(delta.logprobs, logprobs and bool(delta.text), offset),
                finish_reason=finish_reason(delta.finish_reason),
            )
        )
        offsets[delta.index] = offset + len(delta.text)
    return schemas.TextCompletion(
        id=message.id,
        created=_unix_seconds(message.created),
        model=message.model,
        choices=choices,
        usage=_usage(message.usage) if message.HasField("usage") else None,
    )


def model_card_from_proto(model: pb.Model) -> schemas.ModelCard:
    return schemas.ModelCard(
        id=model.id, created=_unix_seconds(model.created), owned_by=model.owned_by
    )


def _encode(values: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


def embeddings_from_proto(
    response: pb.CreateEmbeddingsResponse, encoding: str
) -> schemas.EmbeddingList:
    return schemas.EmbeddingList(
        data=[
            schemas.EmbeddingData(index=item.index, embedding=_encode(item.values, encoding))
            for item in response.embeddings
        ],
        model=response.model,
        usage=schemas.EmbeddingUsage(
            prompt_tokens=response.usage.prompt_tokens, total_tokens=response.usage.prompt_tokens
        ),
    )
