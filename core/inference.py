"""Domain shapes of an inference job, shared by the cloud, the network, the agent
and its runtimes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class ChatRole(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    # Rendered as a system message by templates that have no developer role.
    DEVELOPER = "developer"
    TOOL = "tool"


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-generation token or a stop sequence
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"  # the model called tools (cloud's verdict; nodes say STOP)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a function tool; ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: ChatRole
    content: str
    # An assistant message's tool calls.
    tool_calls: tuple[ToolCall, ...] = ()
    # A tool message: the call it answers ("" for a legacy function result).
    tool_call_id: str = ""
    # The author's name, or a tool result's function; "" for none.
    name: str = ""


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    description: str = ""
    # The arguments' JSON Schema as JSON text; "" takes no arguments.
    parameters: str = ""


class ToolChoiceMode(StrEnum):
    NONE = "none"  # answer in text; tools not offered
    AUTO = "auto"  # text or calls, as the model chooses
    REQUIRED = "required"  # one or more calls
    FUNCTION = "function"  # exactly one call of ToolUse.function


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The functions a job's model may call, and how."""

    tools: tuple[FunctionTool, ...]
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    # With FUNCTION: the function to call.
    function: str = ""
    # AUTO and REQUIRED: several calls in one turn allowed (else exactly one).
    parallel_calls: bool = True


class ResponseFormatType(StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: ResponseFormatType
    # The JSON Schema as JSON text, for JSON_SCHEMA.
    json_schema: str = ""


@dataclass(frozen=True, slots=True)
class Continuation:
    """The start of the assistant's reply, already delivered by another node.

    The runtime continues the same turn: it templates the messages with the
    generation prompt, appends the delivered tokens and generates what follows,
    emitting only new text. ``token_ids`` (when given) are replayed as they
    are; otherwise ``text`` is tokenized, which may split it differently.
    """

    text: str
    token_count: int
    # Empty unless every delivered chunk came with its token ids.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token (its text and exact bytes: a token may end inside a UTF-8
    character), its log-probability under the model, and the most likely tokens at
    its position, most likely first."""

    token: str
    token_bytes: bytes
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Report per-token logprobs, with this many alternatives each (0-20).
    logprobs: bool = False
    top_logprobs: int = 0
    # None: free text. A runtime constrains the output (llama.cpp: a grammar).
    response_format: ResponseFormat | None = None
    # (token id, bias added to its logit), by token id.
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: Sampling
    max_prompt_tokens: int
    # A text completion's prompt, used as it is (no chat template; no messages).
    prompt: str | None = None
    # An embedding job: the node returns the embedding of ``prompt`` instead.
    embed: bool = False
    # Functions the model may call; None: none offered.
    tool_use: ToolUse | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Integer micro-credits per token."""

    prompt: int
    completion: int


@dataclass(frozen=True, slots=True)
class CatalogModel:
    id: str
    owned_by: str
    price: ModelPrice
    context_length: int
    # Tokens a chat template may add on top of the messages' UTF-8 bytes.
    chat_template_overhead_tokens: int
    ready_nodes: int = 0
    # When the model entered the network's catalog (None: not recorded yet).
    created: datetime | None = None


# Events of a job as the network reports them to its caller.
@dataclass(frozen=True, slots=True)
class JobAssigned:
    node_id: str


@dataclass(frozen=True, slots=True)
class JobDelta:
    text: str
    token_count: int
    prompt_tokens: int
    # One per token when the job asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()
    # An embedding job's vector.
    embedding: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class JobMigrated:
    """The job's node was lost; ``node_id`` continues it from the last delivered token."""

    node_id: str
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """The part of a job's usage one node delivered."""

    node_id: str
    usage: Usage
    # The node's operator account (earns its share); empty if it has none.
    operator_account_id: str = ""


@dataclass(frozen=True, slots=True)
class JobFinished:
    finish_reason: FinishReason
    usage: Usage
    # The usage split by node, in assignment order.
    node_usage: tuple[NodeUsage, ...] = ()


JobEvent = JobAssigned | JobDelta | JobMigrated | JobFinished


@dataclass(frozen=True, slots=True)
class NodeRequirements:
    """Which nodes may run a job (a subcloud's rules, a requested region).

    Every non-empty field must hold; the default restricts nothing.
    """

    # Operator accounts (UUID text) whose nodes qualify.
    operator_account_ids: frozenset[str] = frozenset()
    regions: frozenset[str] = frozenset()
    min_reputation: float = 0.0
    # Admitted with an operator's node token and no failed canary since joining.
    verified_only: bool = False


@dataclass(frozen=True, slots=True)
class JobOrigin:
    """Whose request a job serves, for the network's job record; empty: unknown."""

    request_id: str = ""
    # Account (UUID text) the request is billed to.
    account_id: str = ""
    subcloud_id: str = ""
    # The per-token prices the request was admitted at (what its jobs cost).
    price: ModelPrice = ModelPrice(0, 0)


NO_ORIGIN = JobOrigin()


def token_text(piece: bytes) -> str:
    """A token's text; a token may end inside a UTF-8 character (its exact bytes
    travel alongside)."""
    return piece.decode("utf-8", errors="replace")
