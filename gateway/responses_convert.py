"""The Responses API over cloud's chat completions: a Responses request becomes chat
completion parameters, and the chat completion (whole or streamed) becomes a
response or its stream of events.

Pure conversions: cloud runs the request exactly as a chat completion (admission,
holds, rate limits, settlement); nothing here decides anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from gateway import convert
from gateway.errors import INVALID_REQUEST, RATE_LIMIT_EXCEEDED, ApiError
from gateway.responses_schemas import (
    ContentPartEvent,
    ErrorEvent,
    IncompleteDetails,
    InputMessage,
    LifecycleEvent,
    MessageStatus,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseRequest,
    ResponseStatus,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    TextSettings,
)

# Developer messages are instructions, as system messages are for the models served.
_ROLES: dict[str, inference_pb2.ChatRole.ValueType] = {
    "system": inference_pb2.CHAT_ROLE_SYSTEM,
    "developer": inference_pb2.CHAT_ROLE_SYSTEM,
    "user": inference_pb2.CHAT_ROLE_USER,
    "assistant": inference_pb2.CHAT_ROLE_ASSISTANT,
}

# Where cloud's field names (chat completion parameters) are the request's others.
PARAM_RENAMES = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format.json_schema.schema": "text.format.schema",
    "response_format": "text.format",
}


def _response_format(request: ResponseRequest) -> inference_pb2.ResponseFormat | None:
    text_format = request.text.format if request.text is not None else None
    if isinstance(text_format, TextFormatJsonSchema):
        return inference_pb2.ResponseFormat(
            type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            json_schema=json.dumps(text_format.json_schema),
        )
    if isinstance(text_format, TextFormatJsonObject):
        return inference_pb2.ResponseFormat(type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    return None


def _message(message: InputMessage) -> inference_pb2.ChatMessage:
    return inference_pb2.ChatMessage(role=_ROLES[message.role], content=message.text)


def params_from_request(request: ResponseRequest) -> pb.ChatCompletionParams:
    """The chat completion that answers ``request``: its instructions as the first
    system message, then its input items in order."""
    messages = [_message(item) for item in request.input]
    if request.instructions is not None:
        instructions = inference_pb2.ChatMessage(
            role=inference_pb2.CHAT_ROLE_SYSTEM, content=request.instructions
        )
        messages.insert(0, instructions)
    return pb.ChatCompletionParams(
        model=request.model,
        messages=messages,
        max_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        user=request.end_user,
        response_format=_response_format(request),
    )


def _ids(completion_id: str) -> tuple[str, str]:
    """The response's id and its message's, from the chat completion's ("chatcmpl-<hex>")."""
    suffix = completion_id.partition("-")[2] or completion_id
    return f"resp_{suffix}", f"msg_{suffix}"


def _usage(usage: inference_pb2.Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _status(reason: inference_pb2.FinishReason.ValueType) -> MessageStatus:
    return "incomplete" if reason == inference_pb2.FINISH_REASON_LENGTH else "completed"


@dataclass
class _Envelope:
    """What a response repeats of its request, and its identity."""

    request: ResponseRequest
    response_id: str = ""
    message_id: str = ""
    created_at: int = 0
    model: str = ""

    def start(self, completion_id: str, created_at: int, model: str) -> None:
        self.response_id, self.message_id = _ids(completion_id)
        self.created_at, self.model = created_at, model

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputMessage],
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> ResponseObject:
        request = self.request
        text_format = request.text.format if request.text is not None else None
        return ResponseObject(
            id=self.response_id,
            created_at=self.created_at,
            status=status,
            error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            model=self.model or request.model,
            output=output,
            parallel_tool_calls=True
            if request.parallel_tool_calls is None
            else request.parallel_tool_calls,
            temperature=request.temperature,
            text=TextSettings(
                format={"type": "text"}
                if text_format is None
                else text_format.model_dump(by_alias=True, exclude_none=True)
            ),
            tool_choice=request.tool_choice or "auto",
            top_p=request.top_p,
            usage=usage,
            user=request.user,
            metadata=request.metadata or {},
        )

    def message(self, status: MessageStatus, text: str | None) -> OutputMessage:
        content = [] if text is None else [OutputText(text=text)]
        return OutputMessage(id=self.message_id, status=status, content=content)


def response_from_proto(
    request: ResponseRequest, completion: pb.CreateChatCompletionResponse
) -> ResponseObject:
    """The whole response to ``request``, from its chat completion (one choice)."""
    envelope = _Envelope(request)
    envelope.start(completion.id, int(completion.created.seconds), completion.model)
    [choice] = completion.choices
    status = _status(choice.finish_reason)
    return envelope.response(
        status, [envelope.message(status, choice.message.content)], _usage(completion.usage)
    )


def _error_code(error: ApiError) -> str:
    """The error of a failed response, in OpenAI's codes for it."""
    if error.code == RATE_LIMIT_EXCEEDED:
        return RATE_LIMIT_EXCEEDED
    return "invalid_prompt" if error.type == INVALID_REQUEST else "server_error"


@dataclass
class ResponseEvents:
    """Renders a streamed chat completion as the Responses API's events, in OpenAI's
    order: response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta..., then
    response.output_text.done, response.content_part.done, response.output_item.done
    and response.completed (response.incomplete at max_output_tokens) with usage."""

    request: ResponseRequest
    encode: Callable[[StreamEvent], bytes]
    _envelope: _Envelope = field(init=False)
    _sequence: int = 0
    _text: list[str] = field(default_factory=list)
    _status: MessageStatus = "in_progress"

    def __post_init__(self) -> None:
        self._envelope = _Envelope(self.request)

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def render(self, message: pb.StreamChatCompletionResponse) -> bytes | None:
        """The events of one of cloud's messages (None: none)."""
        events: list[StreamEvent] = []
        for delta in message.choices:
            if delta.role != inference_pb2.CHAT_ROLE_UNSPECIFIED:
                self._envelope.start(message.id, int(message.created.seconds), message.model)
                events.extend(self._opened())
            if delta.content:
                self._text.append(delta.content)
                events.append(
                    TextDeltaEvent(
                        sequence_number=self._next(),
                        item_id=self._envelope.message_id,
                        output_index=0,
                        content_index=0,
                        delta=delta.content,
                    )
                )
            if convert.finish_reason(delta.finish_reason) is not None:
                self._status = _status(delta.finish_reason)
                events.extend(self._closed())
        if message.HasField("usage"):
            incomplete = self._status == "incomplete"
            response = self._envelope.response(
                "incomplete" if incomplete else "completed", self._output(), _usage(message.usage)
            )
            events.append(
                LifecycleEvent(
                    type="response.incomplete" if incomplete else "response.completed",
                    sequence_number=self._next(),
                    response=response,
                )
            )
        return b"".join(self.encode(event) for event in events) or None

    def failed(self, error: ApiError) -> bytes:
        """An error after the stream started: an `error` event, then response.failed."""
        failure = ErrorEvent(
            sequence_number=self._next(), code=error.code, message=error.message, param=error.param
        )
        response = self._envelope.response(
            "failed",
            self._output(),
            error=ResponseError(code=_error_code(error), message=error.message),
        )
        failed = LifecycleEvent(
            type="response.failed", sequence_number=self._next(), response=response
        )
        return self.encode(failure) + self.encode(failed)

    def _output(self) -> list[OutputMessage]:
        """The output so far: none before the message opened."""
        if not self._envelope.message_id:
            return []
        return [self._envelope.message(self._status, "".join(self._text))]

    def _opened(self) -> list[StreamEvent]:
        envelope = self._envelope
        opening = envelope.response("in_progress", [])
        return [
            LifecycleEvent(type="response.created", sequence_number=self._next(), response=opening),
            LifecycleEvent(
                type="response.in_progress", sequence_number=self._next(), response=opening
            ),
            OutputItemEvent(
                type="response.output_item.added",
                sequence_number=self._next(),
                output_index=0,
                item=envelope.message("in_progress", None),
            ),
            ContentPartEvent(
                type="response.content_part.added",
                sequence_number=self._next(),
                item_id=envelope.message_id,
                output_index=0,
                content_index=0,
                part=OutputText(text=""),
            ),
        ]

    def _closed(self) -> list[StreamEvent]:
        envelope = self._envelope
        text = "".join(self._text)
        return [
            TextDoneEvent(
                sequence_number=self._next(),
                item_id=envelope.message_id,
                output_index=0,
                content_index=0,
                text=text,
            ),
            ContentPartEvent(
                type="response.content_part.done",
                sequence_number=self._next(),
                item_id=envelope.message_id,
                output_index=0,
                content_index=0,
                part=OutputText(text=text),
            ),
            OutputItemEvent(
                type="response.output_item.done",
                sequence_number=self._next(),
                output_index=0,
                item=envelope.message(self._status, text),
            ),
        ]
