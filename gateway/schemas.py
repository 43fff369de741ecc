"""Pydantic models of the OpenAI JSON the gateway accepts and returns.

Requests ignore unknown fields because OpenAI clients send many that do not
change the reply; the ones that would and that no node serves are refused
(`Unserved`). Responses carry exactly the fields the official SDKs validate.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
)
from pydantic.json_schema import SkipJsonSchema

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The bounds below are cloud's (server/cloud/requests.py); stating them here puts them
# in the OpenAPI document and answers a bad request before it leaves the gateway.
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_CHOICES = 8
MAX_EMBEDDING_INPUTS = 64
MAX_MODEL_LENGTH = 256
MAX_USER_LENGTH = 256
MAX_TOOLS = 128
MAX_NAME_LENGTH = 256
MAX_TOOL_CALL_ID_LENGTH = 256

MAX_LOGIT_BIAS_TOKENS = 300

ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_LENGTH)]
# Token id (JSON keys are strings: "50256") -> bias added to its logit.
LogitBias = Annotated[
    dict[Annotated[int, Field(ge=0, le=INT32_MAX)], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=MAX_LOGIT_BIAS_TOKENS),
]
User = Annotated[str, Field(max_length=MAX_USER_LENGTH)]
StopSequences = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]],
    Field(max_length=MAX_STOP_SEQUENCES),
]

FinishReason = Literal["stop", "length", "tool_calls"]
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


def _str_as_list(value: object) -> object:
    """`stop` may be one string or a list of them (or null: none)."""
    return [value] if isinstance(value, str) else value


def _str_as_text_parts(value: object) -> object:
    """Message content may be a plain string or a list of content parts."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class _Request(BaseModel):
    """Booleans in requests are StrictBool: "stream": "yes" is a 400, not true."""

    model_config = ConfigDict(extra="ignore")


def _unserved(value: object) -> object:
    """A field of OpenAI's API that changes what is generated but that no node serves:
    refused when given (null or empty is not given), never silently dropped."""
    if value is not None and value != [] and value != {}:
        raise ValueError("not supported by this server")
    return None


# Kept out of the OpenAPI document: no value of it is accepted.
Unserved = Annotated[SkipJsonSchema[object], BeforeValidator(_unserved)]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCallParam(_Request):
    name: FunctionName
    # JSON text, as the model wrote it.
    arguments: str


class ToolCallParam(_Request):
    id: str = Field(min_length=1, max_length=MAX_TOOL_CALL_ID_LENGTH)
    type: Literal["function"]
    function: FunctionCallParam


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
# Roles whose messages must have content (an assistant's may be calls only, a legacy
# function result's may be null).
_CONTENT_REQUIRED: frozenset[str] = frozenset({"system", "developer", "user", "tool"})


def _only_for(role: str, field: str, value: object, info: ValidationInfo) -> None:
    if value is not None and info.data.get("role") != role:
        raise ValueError(f"only {role} messages have {field}")


class ChatMessage(_Request):
    """One message of any role; the fields a role does not have are refused, those it
    needs required. Validated in field order: role first."""

    role: Role
    # Assistant: the calls it made (legacy: one function_call).
    tool_calls: list[ToolCallParam] | None = None
    function_call: FunctionCallParam | None = None
    # Tool: the call it answers.
    tool_call_id: str | None = Field(
        default=None, min_length=1, max_length=MAX_TOOL_CALL_ID_LENGTH, validate_default=True
    )
    # A participant's name; a legacy function result's function.
    name: str | None = Field(
        default=None, min_length=1, max_length=MAX_NAME_LENGTH, validate_default=True
    )
    content: Annotated[list[TextPart] | None, BeforeValidator(_str_as_text_parts)] = Field(
        default=None, validate_default=True
    )
    refusal: Unserved = None
    audio: Unserved = None

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _assistant_calls(cls, value: object, info: ValidationInfo) -> object:
        _only_for("assistant", str(info.field_name), value, info)
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "tool":
            raise ValueError("tool messages need the tool_call_id they answer")
        _only_for("tool", "tool_call_id", value, info)
        return value

    @field_validator("name")
    @classmethod
    def _function_named(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "function":
            raise ValueError("function messages need the name of their function")
        return value

    @field_validator("content")
    @classmethod
    def _content_of_role(
        cls, value: list[TextPart] | None, info: ValidationInfo
    ) -> list[TextPart] | None:
        role = info.data.get("role")
        calls = info.data.get("tool_calls") or info.data.get("function_call")
        if value is None and (role in _CONTENT_REQUIRED or (role == "assistant" and not calls)):
            raise ValueError("content is required")
        return value

    @property
    def text(self) -> str:
        # Separate parts stay separate for the model, as most OpenAI-compatible servers do.
        return "\n".join(part.text for part in self.content or ())


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    # The arguments' JSON Schema (an object schema); absent: no arguments.
    parameters: dict[str, object] | None = None
    # Calls always follow the schema (they are generated under its grammar).
    strict: StrictBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


_TOOL_CHOICE_MODES = ("none", "auto", "required")


def _tool_choice_object(value: object) -> object:
    """tool_choice is a mode's name or a named function: one shape, so that an error
    names the field rather than a member of a union."""
    if isinstance(value, str):
        if value not in _TOOL_CHOICE_MODES:
            raise ValueError("must be 'none', 'auto', 'required' or a named function")
        return {"type": value}
    return value


class ToolChoice(_Request):
    type: Literal["none", "auto", "required", "function"]
    function: NamedFunction | None = Field(default=None, validate_default=True)

    @field_validator("function")
    @classmethod
    def _named(cls, value: NamedFunction | None, info: ValidationInfo) -> NamedFunction | None:
        if info.data.get("type") == "function" and value is None:
            raise ValueError("a function tool choice names the function")
        return value


class StreamOptions(_Request):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Request):
    name: str = Field(max_length=64)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute.
    json_schema: dict[str, object] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_with_its_type(
        cls, value: JsonSchemaFormat | None, info: ValidationInfo
    ) -> JsonSchemaFormat | None:
        if info.data.get("type") == "json_schema" and value is None:
            raise ValueError("json_schema is required when type is json_schema")
        return value


class ChatCompletionRequest(_Request):
    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, gt=0, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Annotated[StopSequences | None, BeforeValidator(_str_as_list)] = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: User | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Annotated[
        ToolChoice | None,
        BeforeValidator(
            _tool_choice_object,
            json_schema_input_type=Literal["none", "auto", "required"] | ToolChoice | None,
        ),
    ] = None
    parallel_tool_calls: StrictBool | None = None
    logit_bias: LogitBias | None = None
    # The legacy form of tools: refused (not translated), callers use tools instead.
    functions: Unserved = None
    function_call: Unserved = None
    audio: Unserved = None
    prediction: Unserved = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def effective_max_tokens(self) -> int | None:
        """max_completion_tokens replaced max_tokens in the OpenAI API, so it wins."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# OpenAI's default for /v1/completions (chat completions have none).
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_LEGACY_LOGPROBS = 5


class CompletionRequest(_Request):
    """`POST /v1/completions`: raw text prompts, no chat template."""

    model: ModelName
    # Each prompt is a choice of its own: prompts times n is at most MAX_CHOICES.
    prompt: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        BeforeValidator(_str_as_list),
        Field(min_length=1, max_length=MAX_CHOICES),
    ]
    max_tokens: int | None = Field(default=DEFAULT_COMPLETION_MAX_TOKENS, gt=0, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Annotated[StopSequences | None, BeforeValidator(_str_as_list)] = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: User | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # The legacy API's logprobs is the number of alternatives (0-5) to report.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: StrictBool | None = None
    suffix: str | None = None
    logit_bias: LogitBias | None = None
    # More than one candidate per choice is not served.
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class EmbeddingRequest(_Request):
    """`POST /v1/embeddings`."""

    model: ModelName
    input: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        BeforeValidator(_str_as_list),
        Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
    ]
    # The openai SDK asks for base64 unless told otherwise, and decodes it.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: User | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    # None when the model only called tools.
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: SerializerFunctionWrapHandler) -> object:
        dumped = handler(self)
        if isinstance(dumped, dict) and dumped.get("tool_calls") is None:
            dumped.pop("tool_calls", None)
        return dumped


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(BaseModel):
    """A piece of a streamed tool call: its first has id, type and name (arguments
    empty), the next ones only pieces of the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> object:
        dumped = handler(self)
        if not isinstance(dumped, dict):
            return dumped
        function = {key: value for key, value in dumped["function"].items() if value is not None}
        present = {key: value for key, value in dumped.items() if value is not None}
        return {**present, "function": function}


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None

    @field_serializer("delta", mode="wrap")
    def _omit_absent_delta_fields(
        self, delta: Delta, handler: SerializerFunctionWrapHandler
    ) -> object:
        # OpenAI sends `{}` rather than nulls for what a delta does not change.
        dumped = handler(delta)
        return {key: value for key, value in dumped.items() if value is not None}


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    # Serialised only for callers that asked for usage (see sse.encode_chunk).
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions API's logprobs shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class TextCompletion(BaseModel):
    """A text completion, and (with usage absent or null) one chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # Floats, or base64 of their little-endian float32 bytes.
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
