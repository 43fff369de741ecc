"""Conversions between the OpenAI JSON models and cloud's protobuf messages.

Pure functions: no I/O, no policy. Cloud decides everything; these only rename.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from gateway import schemas

_ROLES: dict[str, inference_pb2.ChatRole.ValueType] = {
    "system": inference_pb2.CHAT_ROLE_SYSTEM,
    "developer": inference_pb2.CHAT_ROLE_DEVELOPER,
    "user": inference_pb2.CHAT_ROLE_USER,
    "assistant": inference_pb2.CHAT_ROLE_ASSISTANT,
    "tool": inference_pb2.CHAT_ROLE_TOOL,
    # A legacy function result is a tool result that names its function.
    "function": inference_pb2.CHAT_ROLE_TOOL,
}
_TOOL_CHOICES: dict[str, inference_pb2.ToolChoiceMode.ValueType] = {
    "none": inference_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": inference_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": inference_pb2.TOOL_CHOICE_MODE_REQUIRED,
    "function": inference_pb2.TOOL_CHOICE_MODE_FUNCTION,
}

# A cancelled job ended because the caller stopped it; OpenAI has no such reason and
# reports "stop" for a generation that ended on request.
_FINISH_REASONS: dict[inference_pb2.FinishReason.ValueType, schemas.FinishReason] = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "stop",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
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


def _message(message: schemas.ChatMessage) -> inference_pb2.ChatMessage:
    calls = [
        inference_pb2.ToolCall(
            id=call.id, name=call.function.name, arguments=call.function.arguments
        )
        for call in message.tool_calls or ()
    ]
    if message.function_call is not None:
        # The legacy form of one call, which had no id.
        legacy = message.function_call
        calls.append(inference_pb2.ToolCall(name=legacy.name, arguments=legacy.arguments))
    return inference_pb2.ChatMessage(
        role=_ROLES[message.role],
        content=message.text,
        tool_calls=calls,
        tool_call_id=message.tool_call_id or "",
        name=message.name or "",
    )


def _tool(tool: schemas.Tool) -> inference_pb2.FunctionTool:
    function = tool.function
    return inference_pb2.FunctionTool(
        name=function.name,
        description=function.description or "",
        parameters="" if function.parameters is None else json.dumps(function.parameters),
    )


def _tool_choice(choice: schemas.ToolChoice | None) -> inference_pb2.ToolChoice | None:
    if choice is None:
        return None
    name = choice.function.name if choice.function is not None else ""
    return inference_pb2.ToolChoice(mode=_TOOL_CHOICES[choice.type], function_name=name)


def params_from_request(request: schemas.ChatCompletionRequest) -> pb.ChatCompletionParams:
    return pb.ChatCompletionParams(
        model=request.model,
        messages=[_message(message) for message in request.messages],
        tools=[_tool(tool) for tool in request.tools or ()],
        tool_choice=_tool_choice(request.tool_choice),
        parallel_tool_calls=request.parallel_tool_calls,
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
        logit_bias=request.logit_bias,
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
                message=_assistant_message(choice.message),
                logprobs=_logprobs(choice.logprobs, logprobs),
                # A finished completion always has a reason; OpenAI's schema requires one.
                finish_reason=finish_reason(choice.finish_reason) or "stop",
            )
            for choice in response.choices
        ],
        usage=_usage(response.usage),
    )


def _assistant_message(message: inference_pb2.ChatMessage) -> schemas.AssistantMessage:
    calls = [
        schemas.ToolCall(
            id=call.id, function=schemas.FunctionCall(name=call.name, arguments=call.arguments)
        )
        for call in message.tool_calls
    ]
    if not calls:
        return schemas.AssistantMessage(content=message.content)
    # A reply of calls alone has no content, as OpenAI's.
    return schemas.AssistantMessage(content=message.content or None, tool_calls=calls)


def _tool_call_chunk(call: pb.ToolCallDelta) -> schemas.ToolCallChunk:
    if call.id:
        # A call's first piece: OpenAI sends its id, type and name with empty arguments.
        return schemas.ToolCallChunk(
            index=call.index,
            id=call.id,
            type="function",
            function=schemas.FunctionDelta(name=call.name, arguments=call.arguments),
        )
    return schemas.ToolCallChunk(
        index=call.index, function=schemas.FunctionDelta(arguments=call.arguments)
    )


def _delta(delta: pb.ChatCompletionDelta) -> dict[str, object]:
    """A chunk's delta with only what it changes: OpenAI sends `{}` rather than nulls."""
    if delta.role != inference_pb2.CHAT_ROLE_UNSPECIFIED:
        # The opening delta: OpenAI sends the role with empty content.
        return {"role": "assistant", "content": delta.content}
    if delta.tool_calls:
        return {"tool_calls": [_tool_call_chunk(call) for call in delta.tool_calls]}
    return {"content": delta.content} if delta.content else {}


_StreamMessage = pb.StreamChatCompletionResponse | pb.StreamCompletionResponse


def _chunk(
    message: _StreamMessage, kind: str, choices: list[dict[str, object]]
) -> dict[str, object]:
    """A streamed chunk as plain data, in the fields and order of its model
    (ChatCompletionChunk, TextCompletion), for sse.encode_chunk: building and dumping
    the model costs four times as much, on every chunk of every stream."""
    return {
        "id": message.id,
        "object": kind,
        "created": _unix_seconds(message.created),
        "model": message.model,
        "choices": choices,
        "usage": _usage(message.usage) if message.HasField("usage") else None,
    }


def chunk_from_proto(
    message: pb.StreamChatCompletionResponse, *, logprobs: bool = False
) -> dict[str, object]:
    """A chat chunk, each delta as ChunkChoice serialises it."""
    choices: list[dict[str, object]] = [
        {
            "index": delta.index,
            "delta": _delta(delta),
            # Content deltas carry their tokens' logprobs; the role and finish deltas none.
            "logprobs": _logprobs(delta.logprobs, logprobs and bool(delta.content)),
            "finish_reason": finish_reason(delta.finish_reason),
        }
        for delta in message.choices
    ]
    return _chunk(message, "chat.completion.chunk", choices)


_Stream = TypeVar("_Stream", pb.StreamChatCompletionResponse, pb.StreamCompletionResponse)


def single_events(message: _Stream) -> list[_Stream]:
    """One of cloud's streamed messages as messages of one event each, in order: one per
    delta, then the usage and billing. The gateway asks for the events that are ready
    together in one message (batch_events) and sends each as the chunk it is alone."""
    usage = message.HasField("usage")
    if len(message.choices) + usage <= 1:
        return [message]
    kind, id_, model, created = type(message), message.id, message.model, message.created
    events = [
        kind(id=id_, model=model, created=created, choices=[delta]) for delta in message.choices
    ]
    if usage:
        events.append(
            kind(id=id_, model=model, created=created, usage=message.usage, billing=message.billing)
        )
    return events


def shows_nothing(message: pb.StreamChatCompletionResponse) -> bool:
    """A message without text or tool calls: the role that opens a choice, the finish
    reasons that end it."""
    return not any(delta.content or delta.tool_calls for delta in message.choices)


def text_shows_nothing(message: pb.StreamCompletionResponse) -> bool:
    """A text completion's message without text: the finish reasons that end choices."""
    return not any(delta.text for delta in message.choices)


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
        logit_bias=request.logit_bias,
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
) -> dict[str, object]:
    """A text completion's chunk, each delta as TextChoice serialises it; ``offsets``
    (choice index -> text sent so far) is updated."""
    choices: list[dict[str, object]] = []
    for delta in message.choices:
        offset = offsets.get(delta.index, 0)
        choices.append(
            {
                "index": delta.index,
                "text": delta.text,
                "logprobs": _text_logprobs(delta.logprobs, logprobs and bool(delta.text), offset),
                "finish_reason": finish_reason(delta.finish_reason),
            }
        )
        offsets[delta.index] = offset + len(delta.text)
    return _chunk(message, "text_completion", choices)


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
