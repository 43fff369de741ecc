"""Pydantic models of OpenAI's Responses API (`POST /v1/responses`) as the gateway
serves it: stateless, text in and text out, over the chat completion path.

Unlike the chat request, a Responses request refuses every field it does not
serve: unknown fields are refused by name (a null is no value), and fields the
API defines whose values would change the answer are refused when given one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from gateway.schemas import (
    INT32_MAX,
    MAX_TOOL_CALL_ID_LENGTH,
    MAX_TOOLS,
    FunctionName,
    ModelName,
    User,
)

# OpenAI's bounds on metadata: 16 pairs, keys of 64 and values of 512 characters.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_FORMAT_NAME = 64


def _refuse(reason: str) -> BeforeValidator:
    """A field of the Responses API this server does not serve: refused with
    ``reason`` when given a value (null, false or empty is none)."""

    def check(value: object) -> object:
        if value is not None and value is not False and value != [] and value != {}:
            raise ValueError(reason)
        return None

    return BeforeValidator(check)


Refused = SkipJsonSchema[object]


class _Strict(BaseModel):
    """Unknown fields are refused (extra_forbidden names them), except nulls."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                key: value
                for key, value in data.items()
                if value is not None or key in cls.model_fields or _is_alias(cls, key)
            }
        return data


def _is_alias(model: type[BaseModel], key: str) -> bool:
    return any(info.alias == key for info in model.model_fields.values())


# --- request -------------------------------------------------------------------------------


class InputText(_Strict):
    """Text in a message: `input_text` (what callers write) or `output_text` (an earlier
    reply passed back), whose annotations and logprobs describe it and change nothing."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[object] | None = None
    logprobs: list[object] | None = None


class Refusal(_Strict):
    """An earlier reply's refusal, passed back as text."""

    type: Literal["refusal"]
    refusal: str


_TEXT_ONLY = (
    "is not supported: the models served here take text only "
    "(use input_text, output_text or refusal parts)"
)


def _content_parts(value: object) -> object:
    """Content is a string or a list of parts; parts other than text are refused."""
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "refusal"):
                raise ValueError(f"content part type {kind!r} {_TEXT_ONLY}")
    return value


ContentPart = Annotated[InputText | Refusal, Field(discriminator="type")]


class InputMessage(_Strict):
    """A message item: what callers send, or an earlier reply's output message passed
    back (its id, status and phase describe it and change nothing)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Annotated[list[ContentPart], BeforeValidator(_content_parts)]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @property
    def text(self) -> str:
        # Parts stay separate for the model, as in chat messages.
        return "\n".join(
            part.text if isinstance(part, InputText) else part.refusal for part in self.content
        )


class FunctionCallItem(_Strict):
    """A function call the model made earlier, passed back (its id and status describe
    it and change nothing)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_TOOL_CALL_ID_LENGTH)
    name: FunctionName
    # JSON text, as the model wrote it.
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _output_text(value: object) -> object:
    """A function's output is a string or a list of text parts."""
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text"):
                raise ValueError(f"output part type {kind!r} {_TEXT_ONLY}")
    return value


class FunctionCallOutputItem(_Strict):
    """The result of a function call, for the call ``call_id`` names."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_TOOL_CALL_ID_LENGTH)
    output: Annotated[str | list[InputText], BeforeValidator(_output_text)]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "\n".join(part.text for part in self.output)


_ITEM_TYPES = ("message", "function_call", "function_call_output")
_FORMAT_TYPES = ("text", "json_object", "json_schema")
# Tags of the unions in lists: input items, and a message's content parts.
_LISTED_TAGS = (*_ITEM_TYPES, "input_text", "output_text", "refusal")


def without_union_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A validation error's location as the request names the field: pydantic puts
    the union member's tag after an input item's index and after "format"
    ("input.0.function_call.name"), which no request has."""
    kept: list[int | str] = []
    for part in loc:
        after_index = bool(kept) and isinstance(kept[-1], int)
        after_format = bool(kept) and kept[-1] == "format"
        if (after_index and part in _LISTED_TAGS) or (after_format and part in _FORMAT_TYPES):
            continue
        kept.append(part)
    return tuple(kept)


def _input_items(value: object) -> object:
    """A string is one user message; an item without a type is a message; items of
    other types (images, files, reasoning, other tools' calls) are refused."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        return value
    items = []
    for item in value:
        if isinstance(item, dict):
            kind = item.get("type", "message")
            if kind not in _ITEM_TYPES:
                raise ValueError(
                    f"input items of type {kind!r} are not supported: send messages, "
                    "function calls and their outputs"
                )
            item = {**item, "type": kind}
        items.append(item)
    return items


InputItem = Annotated[
    InputMessage | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")
]


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=MAX_FORMAT_NAME, pattern=r"^[A-Za-z0-9_-]+$")
    # "schema" would shadow a BaseModel attribute.
    json_schema: dict[str, object] = Field(alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Annotated[
        Refused, _refuse("verbosity is not supported: bound the reply with max_output_tokens")
    ] = None


class ResponseStreamOptions(_Strict):
    include_obfuscation: Annotated[
        Refused, _refuse("obfuscation of stream events is not supported")
    ] = None


class FunctionToolParam(_Strict):
    """A function the model may call: the Responses API's flat form of a chat tool."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    # The arguments' JSON Schema (an object schema); absent: no arguments.
    parameters: dict[str, object] | None = None
    # Calls always follow the schema (they are generated under its grammar).
    strict: StrictBool | None = None


def _function_tools(value: object) -> object:
    """Only function tools are served (no hosted tools: search, files, computers)."""
    if isinstance(value, list):
        for tool in value:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools of type {kind!r} are not supported: only functions")
    return value


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: FunctionName


_TOOL_CHOICE_MODES = ("none", "auto", "required")


def _tool_choice(value: object) -> object:
    """A mode's name or a named function; other choices (hosted tools, allowed_tools)
    are refused in one clear message rather than as a union's members."""
    if value is None or value in _TOOL_CHOICE_MODES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return value
    raise ValueError("must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}")


_NOT_STORED = "is not supported: responses are not stored; send the whole conversation in input"


class ResponseRequest(_Strict):
    """`POST /v1/responses`."""

    model: ModelName
    input: Annotated[list[InputItem], BeforeValidator(_input_items), Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: TextConfig | None = None
    stream: StrictBool = False
    # Accepted either way: nothing is stored (the response reports store false).
    store: StrictBool | None = None
    metadata: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                Annotated[str, Field(max_length=MAX_METADATA_VALUE)],
            ],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
    user: User | None = None
    safety_identifier: User | None = None
    parallel_tool_calls: StrictBool | None = None
    stream_options: ResponseStreamOptions | None = None
    previous_response_id: Annotated[Refused, _refuse(f"previous_response_id {_NOT_STORED}")] = None
    conversation: Annotated[Refused, _refuse(f"conversation {_NOT_STORED}")] = None
    tools: Annotated[
        Annotated[list[FunctionToolParam], Field(max_length=MAX_TOOLS)] | None,
        BeforeValidator(_function_tools),
    ] = None
    tool_choice: Annotated[
        Literal["none", "auto", "required"] | NamedFunctionChoice | None,
        BeforeValidator(_tool_choice),
    ] = None
    truncation: Literal["disabled"] | None = None
    include: Annotated[Refused, _refuse("include is not supported")] = None
    reasoning: Annotated[
        Refused, _refuse("reasoning is not supported: the models served do not reason")
    ] = None
    background: Annotated[
        Refused, _refuse("background responses are not supported: responses are not stored")
    ] = None
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("tool_choice")
    @classmethod
    def _forced_calls_need_tools(
        cls, value: str | NamedFunctionChoice | None, info: ValidationInfo
    ) -> str | NamedFunctionChoice | None:
        if not info.data.get("tools") and value not in (None, "none", "auto"):
            raise ValueError("'required' or a named function needs tools")
        return value

    @property
    def end_user(self) -> str:
        """Who the request is for, as the caller identifies them (either field)."""
        return self.safety_identifier or self.user or ""


# --- response ------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[object] = Field(default_factory=list)
    logprobs: list[object] = Field(default_factory=list)


MessageStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: MessageStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: MessageStatus
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    # OpenAI's codes: server_error, rate_limit_exceeded, invalid_prompt, ...
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class Reasoning(BaseModel):
    effort: None = None
    summary: None = None


class TextSettings(BaseModel):
    format: dict[str, object]


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(BaseModel):
    """A response, whole or as a stream's lifecycle events carry it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: Reasoning = Field(default_factory=Reasoning)
    store: Literal[False] = False
    temperature: float | None
    text: TextSettings
    tool_choice: str | dict[str, str]
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]


class LifecycleEvent(BaseModel):
    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[object] = Field(default_factory=list)


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[object] = Field(default_factory=list)


class ArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(BaseModel):
    """A failure after the stream started (then `response.failed`)."""

    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (
    LifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)


# A streamed event as the stream renders it: plain data with a StreamEvent's fields
# in their order, its response, item or part the models themselves (building and
# dumping the event's model on every token would cost far more).
StreamEventData = dict[str, object]


class ResponseStreamEvent(RootModel[StreamEvent]):
    """One event of a streamed response (for the OpenAPI document)."""
