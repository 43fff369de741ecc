"""The Responses API over cloud's chat completions: a Responses request becomes chat
completion parameters, and the chat completion (whole or streamed) becomes a
response or its stream of events.

Pure conversions: cloud runs the request exactly as a chat completion (admission,
holds, rate limits, settlement, tool calls); nothing here decides anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from resultity.cloud.v1 import inference_service_pb2 as pb
from resultity.common.v1 import inference_pb2

from gateway import convert
from gateway.errors import INVALID_REQUEST, RATE_LIMIT_EXCEEDED, ApiError
from gateway.responses_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolParam,
    IncompleteDetails,
    InputItem,
    InputMessage,
    MessageStatus,
    NamedFunctionChoice,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponseRequest,
    ResponseStatus,
    ResponseUsage,
    StreamEventData,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    TextSettings,
)

_ROLES: dict[str, inference_pb2.ChatRole.ValueType] = {
    "system": inference_pb2.CHAT_ROLE_SYSTEM,
    "developer": inference_pb2.CHAT_ROLE_DEVELOPER,
    "user": inference_pb2.CHAT_ROLE_USER,
    "assistant": inference_pb2.CHAT_ROLE_ASSISTANT,
}
_TOOL_CHOICES: dict[str, inference_pb2.ToolChoiceMode.ValueType] = {
    "none": inference_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": inference_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": inference_pb2.TOOL_CHOICE_MODE_REQUIRED,
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


def _messages(items: Sequence[InputItem]) -> list[inference_pb2.ChatMessage]:
    """The chat's messages: a function call joins the assistant message before it (or
    opens one), as the calls of one assistant turn; a call's output is a tool message."""
    messages: list[inference_pb2.ChatMessage] = []
    for item in items:
        if isinstance(item, InputMessage):
            messages.append(inference_pb2.ChatMessage(role=_ROLES[item.role], content=item.text))
        elif isinstance(item, FunctionCallItem):
            call = inference_pb2.ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
            if not messages or messages[-1].role != inference_pb2.CHAT_ROLE_ASSISTANT:
                messages.append(inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_ASSISTANT))
            messages[-1].tool_calls.append(call)
        else:
            messages.append(_tool_result(item))
    return messages


def _tool_result(item: FunctionCallOutputItem) -> inference_pb2.ChatMessage:
    return inference_pb2.ChatMessage(
        role=inference_pb2.CHAT_ROLE_TOOL, content=item.text, tool_call_id=item.call_id
    )


def _tool(tool: FunctionToolParam) -> inference_pb2.FunctionTool:
    return inference_pb2.FunctionTool(
        name=tool.name,
        description=tool.description or "",
        parameters="" if tool.parameters is None else json.dumps(tool.parameters),
    )


def _tool_choice(
    choice: str | NamedFunctionChoice | None,
) -> inference_pb2.ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, NamedFunctionChoice):
        return inference_pb2.ToolChoice(
            mode=inference_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name=choice.name
        )
    return inference_pb2.ToolChoice(mode=_TOOL_CHOICES[choice])


def params_from_request(request: ResponseRequest) -> pb.ChatCompletionParams:
    """The chat completion that answers ``request``: its instructions as the first
    system message, then its input items in order."""
    messages = _messages(request.input)
    if request.instructions is not None:
        instructions = inference_pb2.ChatMessage(
            role=inference_pb2.CHAT_ROLE_SYSTEM, content=request.instructions
        )
        messages.insert(0, instructions)
    # Without tools, "none", "auto" and parallel_tool_calls change nothing (the schema
    # refuses a choice that needs tools); chat completions take them only with tools.
    tools = request.tools or []
    return pb.ChatCompletionParams(
        model=request.model,
        messages=messages,
        tools=[_tool(tool) for tool in tools],
        tool_choice=_tool_choice(request.tool_choice) if tools else None,
        parallel_tool_calls=request.parallel_tool_calls if tools else None,
        max_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        user=request.end_user,
        response_format=_response_format(request),
    )


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
    """What a response repeats of its request, and its identity: ids derive from the
    chat completion's ("chatcmpl-<hex>": "resp_<hex>", its message "msg_<hex>", the
    call at output index n "fc_<hex>_<n>")."""

    request: ResponseRequest
    suffix: str = ""
    created_at: int = 0
    model: str = ""

    def start(self, completion_id: str, created_at: int, model: str) -> None:
        self.suffix = completion_id.partition("-")[2] or completion_id
        self.created_at, self.model = created_at, model

    @property
    def message_id(self) -> str:
        return f"msg_{self.suffix}"

    def call_id(self, output_index: int) -> str:
        return f"fc_{self.suffix}_{output_index}"

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        error: ResponseError | None = None,
    ) -> ResponseObject:
        request = self.request
        text_format = request.text.format if request.text is not None else None
        # Unset: "auto", as OpenAI reports it.
        choice = request.tool_choice
        return ResponseObject(
            id=f"resp_{self.suffix}",
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
            tool_choice=choice.model_dump()
            if isinstance(choice, NamedFunctionChoice)
            else (choice or "auto"),
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            top_p=request.top_p,
            usage=usage,
            user=request.user,
            metadata=request.metadata or {},
        )

    def message(self, status: MessageStatus, text: str | None) -> OutputMessage:
        content = [] if text is None else [OutputText(text=text)]
        return OutputMessage(id=self.message_id, status=status, content=content)

    def call(
        self, output_index: int, status: MessageStatus, call: inference_pb2.ToolCall
    ) -> OutputFunctionCall:
        return OutputFunctionCall(
            id=self.call_id(output_index),
            status=status,
            call_id=call.id,
            name=call.name,
            arguments=call.arguments,
        )


def response_from_proto(
    request: ResponseRequest, completion: pb.CreateChatCompletionResponse
) -> ResponseObject:
    """The whole response to ``request``, from its chat completion (one choice): its
    text as a message (unless it is only calls), then each call as a function_call."""
    envelope = _Envelope(request)
    envelope.start(completion.id, int(completion.created.seconds), completion.model)
    [choice] = completion.choices
    status = _status(choice.finish_reason)
    reply = choice.message
    output: list[OutputItem] = []
    if reply.content or not reply.tool_calls:
        output.append(envelope.message(status, reply.content))
    for call in reply.tool_calls:
        output.append(envelope.call(len(output), status, call))
    return envelope.response(
        "incomplete" if status == "incomplete" else "completed", output, _usage(completion.usage)
    )


def _error_code(error: ApiError) -> str:
    """The error of a failed response, in OpenAI's codes for it."""
    if error.code == RATE_LIMIT_EXCEEDED:
        return RATE_LIMIT_EXCEEDED
    return "invalid_prompt" if error.type == INVALID_REQUEST else "server_error"


@dataclass
class _OpenItem:
    """The output item being streamed: the message (``call`` None) or a call."""

    index: int
    item_id: str
    text: list[str] = field(default_factory=list)
    call: inference_pb2.ToolCall | None = None


@dataclass
class ResponseEvents:
    """Renders a streamed chat completion as the Responses API's events, in OpenAI's
    order: response.created and response.in_progress; per output item
    response.output_item.added, then for the message response.content_part.added,
    response.output_text.delta..., response.output_text.done and
    response.content_part.done, for a function call
    response.function_call_arguments.delta... and .done; response.output_item.done;
    at last response.completed (response.incomplete at max_output_tokens) with usage.

    The message opens with the first text, so a reply of calls alone has only
    function_call items (a reply with neither has an empty message)."""

    request: ResponseRequest
    encode: Callable[[StreamEventData], bytes]
    _envelope: _Envelope = field(init=False)
    _sequence: int = 0
    _output: list[OutputItem] = field(default_factory=list)
    _open: _OpenItem | None = None
    _status: MessageStatus = "completed"

    def __post_init__(self) -> None:
        self._envelope = _Envelope(self.request)

    def _event(self, type_: str, **fields: object) -> StreamEventData:
        """The next event: ``fields`` in the order of its model's after type and
        sequence_number."""
        self._sequence += 1
        return {"type": type_, "sequence_number": self._sequence - 1, **fields}

    def render(self, message: pb.StreamChatCompletionResponse) -> bytes | None:
        """The events of one of cloud's messages (None: none)."""
        events: list[StreamEventData] = []
        for delta in message.choices:
            if delta.role != inference_pb2.CHAT_ROLE_UNSPECIFIED:
                self._envelope.start(message.id, int(message.created.seconds), message.model)
                events.extend(self._created())
            if delta.content:
                events.extend(self._text(delta.content))
            for piece in delta.tool_calls:
                events.extend(self._call_piece(piece))
            if convert.finish_reason(delta.finish_reason) is not None:
                self._status = _status(delta.finish_reason)
                if self._open is None and not self._output:
                    events.extend(self._open_message())
                events.extend(self._close())
        if message.HasField("usage"):
            incomplete = self._status == "incomplete"
            response = self._envelope.response(
                "incomplete" if incomplete else "completed",
                list(self._output),
                _usage(message.usage),
            )
            events.append(
                self._event(
                    "response.incomplete" if incomplete else "response.completed",
                    response=response,
                )
            )
        return b"".join(self.encode(event) for event in events) or None

    def failed(self, error: ApiError) -> bytes:
        """An error after the stream started: an `error` event, then response.failed
        with what was delivered."""
        failure = self._event("error", code=error.code, message=error.message, param=error.param)
        output = list(self._output)
        if self._open is not None:
            output.append(self._item(self._open, "incomplete"))
        response = self._envelope.response(
            "failed", output, error=ResponseError(code=_error_code(error), message=error.message)
        )
        failed = self._event("response.failed", response=response)
        return self.encode(failure) + self.encode(failed)

    def _created(self) -> list[StreamEventData]:
        opening = self._envelope.response("in_progress", [])
        return [
            self._event("response.created", response=opening),
            self._event("response.in_progress", response=opening),
        ]

    def _item(self, item: _OpenItem, status: MessageStatus) -> OutputItem:
        if item.call is None:
            return self._envelope.message(status, "".join(item.text))
        return self._envelope.call(item.index, status, item.call)

    def _open_message(self) -> list[StreamEventData]:
        index = len(self._output)
        envelope = self._envelope
        self._open = _OpenItem(index, envelope.message_id)
        return [
            self._event(
                "response.output_item.added",
                output_index=index,
                item=envelope.message("in_progress", None),
            ),
            self._event(
                "response.content_part.added",
                item_id=envelope.message_id,
                output_index=index,
                content_index=0,
                part=OutputText(text=""),
            ),
        ]

    def _text(self, text: str) -> list[StreamEventData]:
        events = [] if self._open is not None else self._open_message()
        assert self._open is not None
        self._open.text.append(text)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=self._open.item_id,
                output_index=self._open.index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _call_piece(self, piece: pb.ToolCallDelta) -> list[StreamEventData]:
        """A call's first piece (its id and name) closes the item before it and opens the
        call's; the next ones are pieces of its arguments."""
        events: list[StreamEventData] = []
        if piece.id:
            events.extend(self._close())
            index = len(self._output)
            call = inference_pb2.ToolCall(id=piece.id, name=piece.name)
            self._open = _OpenItem(index, self._envelope.call_id(index), call=call)
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item=self._item(self._open, "in_progress"),
                )
            )
        if piece.arguments and self._open is not None and self._open.call is not None:
            self._open.call.arguments += piece.arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self._open.item_id,
                    output_index=self._open.index,
                    delta=piece.arguments,
                )
            )
        return events

    def _close(self) -> list[StreamEventData]:
        """The events that end the open item (none when none is open)."""
        item, self._open = self._open, None
        if item is None:
            return []
        events: list[StreamEventData]
        if item.call is None:
            text = "".join(item.text)
            events = [
                self._event(
                    "response.output_text.done",
                    item_id=item.item_id,
                    output_index=item.index,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                self._event(
                    "response.content_part.done",
                    item_id=item.item_id,
                    output_index=item.index,
                    content_index=0,
                    part=OutputText(text=text),
                ),
            ]
        else:
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.item_id,
                    output_index=item.index,
                    name=item.call.name,
                    arguments=item.call.arguments,
                )
            ]
        done = self._item(item, self._status)
        self._output.append(done)
        events.append(self._event("response.output_item.done", output_index=item.index, item=done))
        return events
