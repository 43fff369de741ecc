"""What callers ask the cloud for, what they get back, and the checks on it.

Plain dataclasses shared by the chat service and its gRPC servicer; the
validation here is pure, so it is unit-tested without a platform.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from core.errors import InvalidArgument
from core.inference import (
    ChatMessage,
    ChatRole,
    FinishReason,
    FunctionTool,
    ResponseFormat,
    ResponseFormatType,
    Sampling,
    TokenLogprob,
    ToolCall,
    ToolChoiceMode,
    ToolUse,
    Usage,
)
from core.request_limits import (
    TOOL_CHOICE_FIELD,
    check_logit_bias,
    check_messages,
    check_prompt_bytes,
    check_tool_sampling,
    check_tool_use,
    parse_json_schema,
)
from server.cloud.rate_limits import RateStatus

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
# Names and tags, bounded so that what is echoed or logged stays small.
MAX_MODEL_LENGTH = 256
MAX_USER_LENGTH = 256
# Choices run one after another (each its own job), so n bounds the request's time.
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
# Inputs of one embeddings request; each is a job of its own.
MAX_EMBEDDING_INPUTS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """What chat and text completions share: the model and how to sample it."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str = ""
    # Run only on nodes declared in this region ("": anywhere allowed).
    region: str = ""
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # (token id, bias), by token id.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest(GenerationRequest):
    messages: tuple[ChatMessage, ...]
    response_format: ResponseFormat | None = None
    tools: tuple[FunctionTool, ...] = ()
    # None: AUTO when there are tools.
    tool_choice: ToolChoiceMode | None = None
    # With tool_choice FUNCTION: the function.
    tool_choice_function: str = ""
    # None: allowed.
    parallel_tool_calls: bool | None = None

    @property
    def tool_use(self) -> ToolUse | None:
        """What the jobs offer the model: None without tools or with tool choice NONE."""
        mode = self.tool_choice or ToolChoiceMode.AUTO
        if not self.tools or mode is ToolChoiceMode.NONE:
            return None
        parallel = self.parallel_tool_calls is not False
        return ToolUse(self.tools, mode, self.tool_choice_function, parallel)


@dataclass(frozen=True, slots=True, kw_only=True)
class TextRequest(GenerationRequest):
    """A text completion: raw prompts, no chat template."""

    prompts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    user: str = ""
    # Run only on nodes declared in this region ("": anywhere allowed).
    region: str = ""


@dataclass(frozen=True, slots=True)
class Embeddings:
    model: str
    # One vector per input, in order.
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
    charged: int
    rate_limits: RateStatus | None = None


@dataclass(frozen=True, slots=True)
class CompletionStarted:
    completion_id: str
    model: str
    created: datetime
    # The caller's rate limits after this request was admitted.
    rate_limits: RateStatus | None = None
    # The request's jobs, one per choice (or input), in order.
    job_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceStarted:
    index: int


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    # An embedding job's vector.
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a choice's tool call: the first of a call has its id and name, the
    next ones pieces of its arguments."""

    index: int
    call_index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class CompletionFinished:
    usage: Usage
    charged: int
    # Time the nodes spent on the jobs as cloud saw it: from each job's assignment
    # to its end, summed over the choices.
    generation_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Flush:
    """No event of the completion: the events since the last Flush were ready together
    and the next one is not (the stream waits for it), so a caller that sends events
    ready together as one message sends what it holds now."""


FLUSH = Flush()

CompletionEvent = (
    CompletionStarted
    | ChoiceStarted
    | ContentDelta
    | ToolCallDelta
    | ChoiceFinished
    | CompletionFinished
    | Flush
)


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    content: str
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    started: CompletionStarted
    choices: tuple[Choice, ...]
    finished: CompletionFinished


def _check_range(value: float | None, low: float, high: float, field: str) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low:g} and {high:g}", field=field)


def _validate_response_format(response_format: ResponseFormat | None) -> None:
    """A schema must be a JSON object within the size and complexity bounds
    (core/request_limits.py) that keep its grammar cheap and compilable."""
    if response_format is not None and response_format.type == ResponseFormatType.JSON_SCHEMA:
        parse_json_schema(response_format.json_schema)


def _validate_tools(request: ChatRequest) -> None:
    """OpenAI's rules: tool choice and parallel calls only with tools, and with a
    choice that offers them, nothing a call could not coexist with."""
    if not request.tools:
        if request.tool_choice is not None:
            raise InvalidArgument(
                "tool_choice is only allowed when tools are specified", field=TOOL_CHOICE_FIELD
            )
        if request.parallel_tool_calls is not None:
            raise InvalidArgument(
                "parallel_tool_calls is only allowed when tools are specified",
                field="parallel_tool_calls",
            )
        return
    mode = request.tool_choice or ToolChoiceMode.AUTO
    check_tool_use(ToolUse(request.tools, mode, request.tool_choice_function))
    if request.tool_use is not None:
        check_tool_sampling(sampling_for(request, 1))


def _validate_conversation(messages: tuple[ChatMessage, ...]) -> None:
    """Calls only in assistant messages, each naming its function (and with an id,
    but for the legacy function_call); a tool message answers a call made before it
    (or, a legacy function result, names its function)."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        field = f"messages.{index}"
        if message.tool_calls and message.role is not ChatRole.ASSISTANT:
            raise InvalidArgument(
                "only assistant messages carry tool_calls", field=f"{field}.tool_calls"
            )
        for number, call in enumerate(message.tool_calls):
            if not call.name:
                raise InvalidArgument(
                    "a tool call needs a function name",
                    field=f"{field}.tool_calls.{number}.function.name",
                )
            called.add(call.id)
        if message.role is ChatRole.TOOL:
            if message.tool_call_id and message.tool_call_id not in called:
                raise InvalidArgument(
                    f"tool_call_id {message.tool_call_id!r} answers no earlier tool call",
                    field=f"{field}.tool_call_id",
                )
            if not message.tool_call_id and not message.name:
                raise InvalidArgument(
                    "a tool message needs the tool_call_id it answers",
                    field=f"{field}.tool_call_id",
                )
        elif message.tool_call_id:
            raise InvalidArgument(
                "only tool messages carry a tool_call_id", field=f"{field}.tool_call_id"
            )


def validate(request: GenerationRequest | EmbeddingRequest) -> None:
    if not request.model:
        raise InvalidArgument("model is required", field="model")
    if len(request.model) > MAX_MODEL_LENGTH:
        raise InvalidArgument(f"model must be at most {MAX_MODEL_LENGTH} characters", field="model")
    if len(request.user) > MAX_USER_LENGTH:
        raise InvalidArgument(f"user must be at most {MAX_USER_LENGTH} characters", field="user")
    if isinstance(request, EmbeddingRequest):
        if not request.inputs:
            raise InvalidArgument("input must contain at least one text", field="input")
        if not all(request.inputs):
            raise InvalidArgument("input texts must not be empty", field="input")
        for text in request.inputs:
            check_prompt_bytes(len(text.encode()), "input")
        if len(request.inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidArgument(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request", field="input"
            )
        return
    if isinstance(request, ChatRequest):
        if not request.messages:
            raise InvalidArgument("messages must contain at least one message", field="messages")
        check_messages(request.messages, tools=request.tools)
        _validate_conversation(request.messages)
        _validate_response_format(request.response_format)
        _validate_tools(request)
    elif isinstance(request, TextRequest):
        if not request.prompts:
            raise InvalidArgument("prompt must contain at least one prompt", field="prompt")
        if not all(request.prompts):
            raise InvalidArgument("prompts must not be empty", field="prompt")
        for prompt in request.prompts:
            check_prompt_bytes(len(prompt.encode()), "prompt")
        if len(request.prompts) * request.n > MAX_CHOICES:
            raise InvalidArgument(
                f"at most {MAX_CHOICES} choices (prompts times n) per request", field="n"
            )
    if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
        raise InvalidArgument("temperature must be between 0 and 2", field="temperature")
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]", field="top_p")
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("at most 4 stop sequences are allowed", field="stop")
    if any(not sequence for sequence in request.stop):
        raise InvalidArgument("stop sequences must not be empty", field="stop")
    if any(len(sequence) > MAX_STOP_LENGTH for sequence in request.stop):
        raise InvalidArgument(
            f"stop sequences must be at most {MAX_STOP_LENGTH} characters", field="stop"
        )
    if not 1 <= request.n <= MAX_CHOICES:
        raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}", field="n")
    _check_range(request.presence_penalty, -2.0, 2.0, "presence_penalty")
    _check_range(request.frequency_penalty, -2.0, 2.0, "frequency_penalty")
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise InvalidArgument("top_logprobs requires logprobs to be true", field="top_logprobs")
        _check_range(request.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
    check_logit_bias(request.logit_bias)


def sampling_for(request: GenerationRequest, max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=request.stop,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs or 0,
        response_format=request.response_format if isinstance(request, ChatRequest) else None,
        logit_bias=request.logit_bias,
    )
